"""The checkpoint tools answer instead of crashing, whatever they are pointed at: real bad bytes
on disk (a binary `latest`, a corrupt trainer_state.json, a flipped shard byte, a `latest` that
points outside the run), and every way of naming a checkpoint (run directory, checkpoints
directory, `latest`, step directory)."""

from __future__ import annotations

import io
import shutil
from contextlib import redirect_stderr, redirect_stdout

import pytest

from faults.hostile_corpus import _rehash


def _cli(*argv) -> tuple[int, str]:
    from shardtune.cli import main

    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        code = main([str(a) for a in argv])
    return code, out.getvalue()


@pytest.fixture
def run_dir(small_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(small_run, copy)
    return copy


@pytest.mark.parametrize("form", ["run", "checkpoints", "latest", "step"])
def test_every_ckpt_command_takes_every_way_of_naming_a_checkpoint(run_dir, tmp_path, form):
    ckpts = run_dir / "checkpoints"
    where = {"run": run_dir, "checkpoints": ckpts, "latest": ckpts / "latest", "step": ckpts / "step-00000002"}[form]
    code, text = _cli("ckpt", "inspect", where)
    assert code == 0 and f"checkpoint   {ckpts / 'step-00000002'}" in text and "step         2" in text, text
    code, text = _cli("ckpt", "verify", where)
    assert code == 0 and f"ok       {ckpts / 'step-00000002'}" in text, text
    assert (f"ok       {ckpts / 'step-00000001'}" in text) == (form in ("run", "checkpoints")), text
    code, text = _cli("ckpt", "ls", where)
    assert code == 0 and "step-00000002" in text and "<- latest" in text, text
    code, text = _cli("ckpt", "export", where, tmp_path / "hf")
    assert code == 0 and (tmp_path / "hf" / "config.json").is_file(), text
    code, text = _cli("ckpt", "reshard", where, tmp_path / "resharded", "--world-size", "1")
    assert code == 0 and (tmp_path / "resharded" / "manifest.json").is_file(), text


def test_binary_latest_is_named_not_a_crash(run_dir):
    ckpts = run_dir / "checkpoints"
    (ckpts / "latest").write_bytes(b"\xff\xfe\x00step")
    code, text = _cli("ckpt", "ls", ckpts)
    assert code == 0 and f"latest: unusable ({ckpts / 'latest'}: not a checkpoint name (binary content))" in text
    assert text.count("sizes ok") == 2, text
    code, text = _cli("ckpt", "inspect", ckpts)
    assert code == 4 and "not a checkpoint name (binary content)" in text, text


@pytest.mark.parametrize("target", ["/etc", "../../elsewhere/step-00000002", "step-00000002/../../x"])
def test_latest_pointing_outside_is_never_followed(run_dir, target):
    ckpts = run_dir / "checkpoints"
    (ckpts / "latest").write_text(target + "\n")
    code, text = _cli("ckpt", "inspect", run_dir)
    assert code == 4 and "is never followed" in text and "Traceback" not in text, text


def test_corrupt_trainer_state_is_named(run_dir):
    step = run_dir / "checkpoints" / "step-00000002"
    (step / "trainer_state.json").write_bytes(b'{"step": 2, "tokens')
    _rehash(step)  # as a copied-over checkpoint would be: the hashes match, the JSON does not parse
    code, text = _cli("ckpt", "inspect", step)
    assert code == 4, text
    assert f"{step / 'trainer_state.json'}: checkpoint file is not JSON (Unterminated string" in text, text


def test_ls_says_sizes_ok_and_checksums_find_the_flipped_byte(run_dir):
    ckpts = run_dir / "checkpoints"
    shard = ckpts / "step-00000002" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    code, text = _cli("ckpt", "ls", ckpts)
    assert code == 0 and " ok" not in text.replace("sizes ok", "") and text.count("sizes ok") == 2, text
    code, text = _cli("ckpt", "ls", ckpts, "--checksums")
    assert code == 0 and f"INVALID: {shard}: sha256 mismatch" in text and "ok (sha256)" in text, text
    code, text = _cli("ckpt", "verify", ckpts)
    assert code == 4 and f"CORRUPT  {shard}: sha256 mismatch" in text, text


def test_corrupt_data_manifest_is_named(tmp_path):
    from shardtune.data.shards import read_manifest
    from shardtune.errors import ShardError

    (tmp_path / "manifest.json").write_text('{"format_version": 1, "splits": {')
    with pytest.raises(ShardError, match=r"manifest.json: data manifest is not JSON \(Expecting"):
        read_manifest(tmp_path)
