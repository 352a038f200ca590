"""Bad inputs that used to end in a traceback: each is one line naming the key or file, with the
exit code from the table in shardtune/errors.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, TINY, run_env


def _shardtune(*argv, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardtune", *map(str, argv)], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("argv, fragment", [
    (["launch", TINY, "--nproc", "0"], "--nproc must be at least 1 (got 0)"),
    (["launch", TINY, "--nproc", "-2"], "--nproc must be at least 1 (got -2)"),
    (["launch", TINY, "--nproc", "3"], "train.global_batch_size=8 must split into 3 ranks x whole micro-batches"),
    (["train", TINY, "model.config=null", "model.name_or_path=/no/such/model"],
     "'model.name_or_path': Value error, no such file or directory: /no/such/model"),
    (["train", TINY, "tokenizer.name_or_path=./no/such/tokenizer"],
     "'tokenizer.name_or_path': Value error, no such file or directory: ./no/such/tokenizer"),
    (["train", TINY, "data.seq_len=512"], "data.seq_len=512 is longer than the model's max_position_embeddings=256"),
    (["train", TINY, f"run.output_dir={TINY}"], f"run.output_dir={TINY} exists and is not a directory"),
], ids=["nproc-0", "nproc-neg", "batch-split", "no-model-dir", "no-tokenizer-dir", "seq-len", "output-file"])
def test_bad_input_is_one_line(argv, fragment):
    out = _shardtune(*argv, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert fragment in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]


def test_remote_code_model_is_refused_in_one_line_and_its_code_never_runs(tmp_path):
    sentinel = tmp_path / "REMOTE_CODE_RAN"
    model = tmp_path / "remote-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "shardtune_test_remote", "auto_map": {"AutoConfig": "configuration_remote.RemoteConfig",
                                                            "AutoModelForCausalLM": "modeling_remote.RemoteModel"},
    }))
    code = f"open({str(sentinel)!r}, 'w').close()\nfrom transformers import PretrainedConfig\n" \
           "class RemoteConfig(PretrainedConfig):\n    model_type = 'shardtune_test_remote'\n"
    (model / "configuration_remote.py").write_text(code)
    (model / "modeling_remote.py").write_text(code)
    out = _shardtune("train", TINY, f"run.output_dir={tmp_path / 'run'}", "model.config=null",
                     f"model.name_or_path={model}", "train.max_steps=1")
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"model.name_or_path={model} ships its own Python code" in out.stderr, out.stderr[-3000:]
    assert "model.trust_remote_code=true" in out.stderr and "Traceback" not in out.stderr
    assert not sentinel.exists()


def test_prepared_data_without_a_validation_split_is_an_error_unless_eval_split_says_train(tmp_path):
    from shardtune.data.synthetic_tasks import main as generate_tickets

    data = tmp_path / "tickets.jsonl"
    generate_tickets([str(data), "--records", "200"])
    prepared = tmp_path / "prep"
    prep = _shardtune("data", "prepare", TINY, data, f"data.prepared_dir={prepared}", "--no-progress",
                      "data.prepare.splits.train=0.9", "data.prepare.splits.validation=0", "data.prepare.splits.test=0.1")
    assert prep.returncode == 0, prep.stderr
    run = ["train", TINY, "data.source=prepared", f"data.prepared_dir={prepared}",
           f"tokenizer.name_or_path={prepared / 'tokenizer'}", "train.max_steps=2"]
    refused = _shardtune(*run, f"run.output_dir={tmp_path / 'refused'}")
    assert refused.returncode == 2, refused.stderr
    assert "the data has no validation split" in refused.stderr and "eval.split=train" in refused.stderr
    on_train = _shardtune(*run, f"run.output_dir={tmp_path / 'on-train'}", "eval.split=train")
    assert on_train.returncode == 0, on_train.stderr
    assert "on the **training split** (eval.split=train" in (tmp_path / "on-train" / "report.md").read_text()
