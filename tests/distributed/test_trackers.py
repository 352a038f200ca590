"""W&B (offline) and MLflow (file store) beside TensorBoard in a 2-rank run, on data prepared
from a Hugging Face ``save_to_disk`` dataset: each holds exactly one run with the run's metrics.

The W&B run file is read record by record with wandb's own protobuf messages: in wandb 0.2x+
the reader lives in the Go core, so the (LevelDB-log) framing is unpacked here.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest
from conftest import ROOT, TINY, run_env, run_shardtune

pytestmark = pytest.mark.distributed

WANDB_BLOCK = 32 * 1024
WANDB_HEADER = 7  # ":W&B" + magic (2 bytes) + version


def wandb_records(path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, pending = WANDB_HEADER, b""
    while pos + 7 <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        pending += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # a whole record, or the last fragment of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_and_mlflow_file_store_hold_one_run_each(tmp_path):
    import datasets

    from shardtune.data.synthetic import generate_records

    datasets.Dataset.from_list(generate_records(600, seed=3)).save_to_disk(str(tmp_path / "hf"))
    prepared = tmp_path / "prepared"
    proc = subprocess.run([sys.executable, "-m", "shardtune", "data", "prepare", str(TINY), str(tmp_path / "hf"),
                           "--out", str(prepared), "--no-progress"], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "run"
    store = tmp_path / "mlruns"
    run = run_shardtune(
        out, "data.source=prepared", f"data.prepared_dir={prepared}", f"tokenizer.name_or_path={prepared / 'tokenizer'}",
        "metrics.trackers=[tensorboard,jsonl,wandb,mlflow]", nproc=2,
        env={"WANDB_MODE": "offline", "WANDB_PROJECT": "shardtune-test", "MLFLOW_TRACKING_URI": store.as_uri(),
             "MLFLOW_EXPERIMENT_NAME": "trackers-test"},
    )
    losses = {r["step"]: r["loss"] for r in run.metrics("train")}
    assert sorted(losses) == list(range(1, 9))

    # W&B: one offline run directory, its history the same losses, the config and result in it.
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    records = list(wandb_records(next(runs[0].glob("run-*.wandb"))))
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            if "train/loss" in items:
                history[items["_step"]] = items["train/loss"]
    assert history == pytest.approx(losses, rel=1e-12)
    run_records = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert len(run_records) == 1 and run_records[0].display_name == "tiny"
    config = {i.key: json.loads(i.value_json) for i in run_records[0].config.update}
    assert config["train"]["global_batch_size"] == 8
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
    assert summary["result/steps"] == 8 and summary["result/final/loss"] == pytest.approx(run.result["final"]["loss"])
    assert json.loads((out / "trackers.json").read_text())["wandb"] == runs[0].name.rsplit("-", 1)[1]

    # MLflow: one run in the experiment, every train loss at its step, params and final numbers.
    import os

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("trackers-test")
    found = client.search_runs([experiment.experiment_id])
    assert len(found) == 1
    mlrun = found[0]
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "tiny"
    logged = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, "train/loss")}
    assert logged == pytest.approx(losses, rel=1e-12)
    assert mlrun.data.params["train.lr"] == "0.003" and mlrun.data.params["distributed.strategy"] == "ddp"
    assert mlrun.data.metrics["result/steps"] == 8
    assert [m.step for m in client.get_metric_history(mlrun.info.run_id, "val/loss")] == [0, 8]
