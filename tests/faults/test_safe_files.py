"""Security of what shardtune writes and reads: run directories nobody else can write into,
and no code path that unpickles arbitrary objects."""

from __future__ import annotations

import ast
import os
import stat

import pytest
from conftest import ROOT, run_shardtune

from shardtune.config import ModelSection


@pytest.mark.distributed
def test_run_directories_are_not_group_or_world_writable(tmp_path):
    out = tmp_path / "runs" / "nested" / "run"
    ckpts = tmp_path / "elsewhere" / "ckpts"
    previous = os.umask(0o002)  # a common cluster umask: group-writable by default
    try:
        run_shardtune(out, "train.max_steps=2", f"checkpoint.dir={ckpts}", "checkpoint.every_steps=1")
    finally:
        os.umask(previous)
    created = [tmp_path / "runs", tmp_path / "runs" / "nested", out, tmp_path / "elsewhere", ckpts,
               ckpts / "step-00000002", ckpts / "step-00000002" / "rng"]
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in created}
    assert set(modes.values()) == {"0o750"}, modes
    shared_write = [
        str(p) for root in (out, ckpts) for p in [root, *root.rglob("*")]
        if stat.S_IMODE(p.lstat().st_mode) & (stat.S_IWGRP | stat.S_IWOTH)
    ]
    assert not shared_write, shared_write
    assert (out / "tensorboard").is_dir() and list(ckpts.glob("step-*/*.distcp"))  # the walk saw them


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            keywords = {k.arg: k.value for k in node.keywords}
            yield owner, node.func.attr, keywords, node.lineno


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_no_code_path_unpickles_arbitrary_objects():
    offenders = []
    for path in sorted([*(ROOT / "shardtune").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]):
        for owner, attr, kw, line in _calls(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT)}:{line}"
            if owner == "torch" and attr == "load" and not _is_true(kw.get("weights_only")):
                offenders.append(f"{where}: torch.load without weights_only=True")
            if owner == "pickle" and attr in ("load", "loads"):
                offenders.append(f"{where}: pickle.{attr}")
            if owner == "np" and attr == "load" and _is_true(kw.get("allow_pickle")):
                offenders.append(f"{where}: np.load(allow_pickle=True)")
    assert not offenders, offenders
    assert ModelSection.model_fields["trust_remote_code"].default is False
