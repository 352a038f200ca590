"""``metrics.trackers``: what the config accepts, and the error when a tracker's extra is missing."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, TINY

from shardtune.config import load_config
from shardtune.errors import ConfigError, MissingExtraError, exit_code_for
from shardtune.eval.trackers import result_metrics


def test_trackers_default_and_validation():
    assert load_config(TINY).metrics.trackers == ["tensorboard", "jsonl"]
    cfg = load_config(TINY, ["metrics.trackers=[jsonl,wandb,mlflow,wandb]"])
    assert cfg.metrics.trackers == ["jsonl", "wandb", "mlflow"]
    with pytest.raises(ConfigError, match="must include jsonl"):
        load_config(TINY, ["metrics.trackers=[wandb]"])
    with pytest.raises(ConfigError, match="metrics.trackers"):
        load_config(TINY, ["metrics.trackers=[jsonl,comet]"])


# Without site-packages (python -S) neither wandb nor mlflow can be imported: the check must
# name the package and the extra that installs it.
MISSING = """
import sys
sys.path.insert(0, {root!r})
from shardtune.errors import MissingExtraError
from shardtune.eval.trackers import check_installed
check_installed(["jsonl"])  # jsonl needs no package
for name in ("wandb", "mlflow"):
    try:
        check_installed(["jsonl", name])
    except MissingExtraError as exc:
        print(exc)
"""


def test_a_missing_extra_is_an_error_naming_it():
    proc = subprocess.run([sys.executable, "-S", "-c", MISSING.format(root=str(ROOT))], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    wandb, mlflow = proc.stdout.strip().splitlines()
    assert "names wandb, but the 'wandb' package is not installed: pip install 'shardtune[wandb]'" in wandb
    assert "pip install 'shardtune[mlflow]'" in mlflow
    assert exit_code_for(MissingExtraError("x"))[0] == 2


def test_result_metrics_are_the_numbers_of_the_result():
    result = {"steps": 8, "tokens_per_s": 10.5, "final": {"loss": 2.0, "confusion": [[1]]}, "resumed_from": None,
              "completed": True}
    assert result_metrics(result) == {"result/steps": 8.0, "result/tokens_per_s": 10.5, "result/final/loss": 2.0}


def test_a_resumed_run_continues_its_mlflow_and_wandb_runs(tmp_path, monkeypatch):
    # The logger as the loop drives it, twice in one output directory: a first invocation
    # stopped after step 2 and a resumed one from step 2 (real MLflow file store, W&B offline).
    from mlflow.tracking import MlflowClient

    from shardtune.train.metrics import MetricsLogger

    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the tracker sets for a file: URI
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = {"train": {"lr": 0.1}, "run": {"name": "resume"}}
    for start, stop in ((0, 2), (2, 4)):
        log = MetricsLogger(tmp_path, enabled=True, trackers=["jsonl", "mlflow", "wandb"], progress=False,
                            total_steps=4, run_name="resume", config=config)
        log.start_at(start)
        for step in range(start + 1, stop + 1):
            log.log(step, {"loss": 1.0 / step})
        log.close({"steps": stop, "final": {"loss": 1.0 / stop}})
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("shardtune").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "train/loss")}
    assert history == {1: 1.0, 2: 0.5, 3: 1 / 3, 4: 0.25}
    assert runs[0].data.params["train.lr"] == "0.1" and runs[0].data.metrics["result/steps"] == 4
    ids = {path.name.rsplit("-", 1)[1] for path in (tmp_path / "wandb").glob("offline-run-*")}
    assert len(ids) == 1  # two offline directories at most, one W&B run id
