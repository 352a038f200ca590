"""Bad inputs get a clear error naming the key, file or line — never a traceback from deep
inside torch as the user-facing message."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
from conftest import ROOT, TINY, run_env

from shardtune.config import PrepareSection, load_config
from shardtune.data.prepare import prepare_dataset
from shardtune.data.tokenizer import train_tokenizer
from shardtune.errors import ConfigError, DataError

# (overrides, a fragment the message must contain: the key, and usually the reason)
BAD_CONFIGS = [
    (["train.lrr=1"], "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    (["trian.lr=1"], "unknown key 'trian'"),
    (["distributed.stratgy=fsdp"], "did you mean 'distributed.strategy'"),
    (["model.nme_or_path=x"], "unknown key 'model.nme_or_path'"),
    (["checkpoint.every=10"], "unknown key 'checkpoint.every'"),
    (["metrics.log_evry=5"], "did you mean 'metrics.log_every'"),
    (["train.max_steps=many"], "'train.max_steps'"),
    (["train.lr=fast"], "'train.lr'"),
    (["train.micro_batch_size=0"], "'train.micro_batch_size'"),
    (["train.micro_batch_size=2.5"], "'train.micro_batch_size'"),
    (["train.betas=0.9"], "'train.betas'"),
    (["train.lr=-3e-4"], "'train.lr'"),
    (["train.weight_decay=-0.1"], "'train.weight_decay'"),
    (["train.warmup_steps=-1"], "'train.warmup_steps'"),
    (["train.schedule=exponential"], "'train.schedule'"),
    (["train.on_nonfinite=ignore"], "'train.on_nonfinite'"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], "must be a multiple of"),
    (["train.max_steps=null"], "set train.max_steps or train.epochs"),
    (["train.epochs=0"], "'train.epochs'"),
    (["distributed.strategy=zero4"], "'distributed.strategy'"),
    (["distributed.precision=fp8"], "'distributed.precision'"),
    (["distributed.collective_timeout_s=0"], "'distributed.collective_timeout_s'"),
    (["distributed.deepspeed={zero_optimization: {stage: 2}}"], "only used by zero1/zero2/zero3"),
    (["distributed.strategy=zero3", "distributed.deepspeed={zero_optimization: {stage: 2}}"],
     "zero_optimization.stage=2 contradicts distributed.strategy=zero3"),
    (["distributed.strategy=zero3", "distributed.deepspeed={train_batch_size: 64}"],
     "distributed.deepspeed.train_batch_size is derived from train.global_batch_size"),
    (["distributed.strategy=zero2", "distributed.deepspeed={gradient_clipping: 0.5}"],
     "derived from train.max_grad_norm"),
    (["distributed.strategy=zero1", "distributed.deepspeed={optimizer: {type: Adam}}"],
     "shardtune builds the optimizer"),
    (["model.name_or_path=some/model"], "set exactly one of model.name_or_path or model.config"),
    (["model.config={hidden_size: 8}"], "model.config needs a 'model_type'"),
    (["data.source=jsonl"], "data.source=jsonl needs data.path"),
    (["data.source=parquet"], "'data.source'"),
    (["data.seq_len=4"], "'data.seq_len'"),
    (["data.prepare.splits.validation=1.5"], "'data.prepare.splits.validation'"),
    (["tokenizer.vocab_size=10"], "'tokenizer.vocab_size'"),
    (["checkpoint.keep_last=0"], "'checkpoint.keep_last'"),
    (["checkpoint.on_save_error=retry"], "'checkpoint.on_save_error'"),
    (["train.lr.x=1"], "'train.lr' is a value, not a section"),
    (["justakey"], "not of the form key.sub=value"),
]


@pytest.mark.parametrize("overrides, fragment", BAD_CONFIGS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_config_is_named(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    message = str(err.value)
    assert fragment in message, message
    assert "Traceback" not in message


def test_at_least_thirty_bad_configs():
    assert len(BAD_CONFIGS) >= 30


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "does-not-exist.yaml"], "config file not found: does-not-exist.yaml"),
        (["train", str(TINY), "data.source=jsonl", "data.path=/no/such.jsonl"], "data file not found: /no/such.jsonl"),
        (["config", "show", str(TINY), "train.lrr=1"], "did you mean 'train.lr'"),
        (["ckpt", "verify", "/no/such/checkpoint"], "neither a checkpoint nor a directory of checkpoints"),
    ],
)
def test_cli_reports_without_traceback(argv, fragment):
    out = subprocess.run([sys.executable, "-m", "shardtune", *argv], capture_output=True, text=True,
                         env=run_env(), cwd=ROOT, timeout=120)
    assert out.returncode != 0
    assert fragment in out.stderr + out.stdout
    assert "Traceback" not in out.stderr


# (raw bytes of one JSONL line, the drop reason the error must name at that line)
BAD_RECORDS = [
    (b'{"text": "ok", ', "malformed_json"),
    (b"not json at all", "malformed_json"),
    (b'["a", "list"]', "not_an_object"),
    (b'"just a string"', "not_an_object"),
    (b'{"prompt": "p"}', "missing_field"),
    (b'{"completion": "c"}', "missing_field"),
    (b'{"label": "x"}', "missing_field"),
    (b'{"messages": []}', ""),
    (b'{"text": 42}', "wrong_type"),
    (b'{"prompt": ["p"], "completion": "c"}', "wrong_type"),
    (b'{"messages": "hello"}', "wrong_type"),
    (b'{"messages": [{"role": "user"}]}', ""),
    (b'{"messages": [{"role": "robot", "content": "x"}]}', "unknown_role"),
    (b'{"messages": [{"role": "user", "content": 7}]}', "wrong_type"),
    (b'{"text": "caf\xe9 latin-1 bytes"}', "undecodable"),
    (b'\xff\xfe{"text": "bom garbage"}', "undecodable"),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    rng = random.Random(0)
    texts = [" ".join(rng.choices("alpha beta gamma delta user assistant".split(), k=20)) for _ in range(100)]
    return train_tokenizer(texts, 300, tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("line, reason", BAD_RECORDS)
def test_bad_record_error_names_file_and_line(tmp_path, tokenizer, line, reason):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"text": "alpha beta gamma delta"}).encode()
    path.write_bytes(good + b"\n" + good.replace(b"alpha", b"beta") + b"\n" + line + b"\n")
    with pytest.raises(DataError) as err:
        prepare_dataset(PrepareSection(on_bad_record="error", progress=False), tmp_path / "out",
                        inputs=[str(path)], tokenizer=tokenizer)
    assert f"{path}:3" in str(err.value)
    assert reason in str(err.value)


def test_at_least_fifteen_bad_records():
    assert len(BAD_RECORDS) >= 15
