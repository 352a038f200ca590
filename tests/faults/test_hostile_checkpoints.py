"""Hostile checkpoints tried from outside: crafted ``.metadata`` pickles, pickles where JSON
belongs, pickles in tensor bytes, each with a re-hashed manifest (so checksums pass). Every
entry point that reads a checkpoint or a run directory refuses each one, naming the file and
the reason, and no payload ever runs (the sentinel file it would create never appears).

The corpus is generated here from one genuine checkpoint built once (tests/faults/hostile_corpus.py).
"""

from __future__ import annotations

import importlib
import io
import pickle
import shutil
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from conftest import ROOT, TINY, run_env, run_shardtune

from faults.hostile_corpus import build_corpus, payloads
from shardtune.checkpoint.export import load_logical_tensors
from shardtune.checkpoint.manifest import CHECKPOINT_ERRORS
from shardtune.checkpoint.safe_io import ALLOWED_GLOBALS, CLASS_GLOBALS, check_checkpoint, safe_load_metadata
from shardtune.errors import UnsafeCheckpointError

# What pickling real DCP metadata references, for every strategy (ddp, fsdp, zero3 give the same
# set; test_allow_list_is_what_real_metadata_references derives it again). A torch upgrade that
# changes it fails that test, and this list is updated deliberately, never widened by a prefix.
PINNED_CLASS_GLOBALS = {
    ("pathlib", "PosixPath"),
    ("torch", "Size"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.serialization", "_get_layout"),
}
# The issue's own attack: a dotted name under an allowed module, then the genuine metadata.
ISSUE_VECTOR = "metadata:dotted-torch.distributed.checkpoint.filesystem:os.system"
REFUSED = "torch.distributed.checkpoint.filesystem.os.system (a dotted name"


@pytest.fixture(scope="module")
def genuine(small_run) -> Path:
    return small_run / "checkpoints" / "step-00000002"  # read only: the corpus copies it


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sentinel") / "PAYLOAD_RAN"
    yield path
    time.sleep(0.5)  # a Popen payload would create it asynchronously
    assert not path.exists(), "a hostile checkpoint ran its payload"


@pytest.fixture(scope="module")
def corpus(genuine, sentinel, tmp_path_factory):
    variants = build_corpus(genuine, tmp_path_factory.mktemp("corpus") / "checkpoints", sentinel)
    return {v.name: v for v in variants}


def _globals_of(raw: bytes) -> set[tuple[str, str]]:
    """Every global a pickle references, recorded while the stock unpickler loads it (used on our
    own freshly written metadata only)."""
    seen = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    Recorder(io.BytesIO(raw)).load()
    return seen


def test_allow_list_is_what_real_metadata_references(genuine, tmp_path):
    found = {"ddp": _globals_of((genuine / ".metadata").read_bytes())}
    for strategy in ("fsdp", "zero3"):
        out = tmp_path / strategy
        run_shardtune(out, f"distributed.strategy={strategy}", "train.max_steps=1")
        found[strategy] = _globals_of((out / "checkpoints" / "step-00000001" / ".metadata").read_bytes())
    dtypes = {k for k in ALLOWED_GLOBALS if k not in CLASS_GLOBALS}
    for strategy, refs in found.items():
        assert refs - dtypes == PINNED_CLASS_GLOBALS, (strategy, refs)
    assert set(CLASS_GLOBALS) == PINNED_CLASS_GLOBALS
    # Exact names only, and each resolves to the very object the table holds (the layout lookup
    # is our own exact-name stand-in for torch's).
    for (module, name), obj in ALLOWED_GLOBALS.items():
        assert "." not in name, name
        if (module, name) != ("torch.serialization", "_get_layout"):
            assert getattr(importlib.import_module(module), name) is obj, (module, name)
    assert {n for m, n in dtypes} >= {"float32", "bfloat16", "float16", "int64", "contiguous_format"}


def test_every_vector_is_real(corpus, sentinel, tmp_path):
    """Not a straw man: under a plain unpickler the call payloads run (in a child process)."""
    names = ("GLOBAL-os.system", "STACK_GLOBAL-subprocess.Popen", "GLOBAL-builtins.eval", "INST-os.system",
             "OBJ-os.system", "dotted-torch.distributed.checkpoint.filesystem:os.system",
             "BUILD-__setstate__=os.system(dotted)")
    probes = [tmp_path / f"probe-{i}" for i in range(len(names))]
    pickles = [b"\x80\x04" + payloads(probe)[name] + b"N." for name, probe in zip(names, probes, strict=True)]
    script = "import pickle, sys\nfor p in sys.argv[1:]:\n    pickle.loads(open(p, 'rb').read())\n"
    files = []
    for i, raw in enumerate(pickles):
        files.append(tmp_path / f"payload-{i}.pkl")
        files[-1].write_bytes(raw)
    subprocess.run([sys.executable, "-c", script, *map(str, files)], capture_output=True, timeout=120, check=True)
    deadline = time.monotonic() + 10
    while not all(p.exists() for p in probes) and time.monotonic() < deadline:
        time.sleep(0.05)  # Popen's touch runs asynchronously
    assert {n: p.exists() for n, p in zip(names, probes, strict=True)} == dict.fromkeys(names, True)
    assert not sentinel.exists()


def test_corpus_is_refused_by_the_checks_and_the_loader(corpus, genuine):
    assert len(corpus) >= 30
    check_checkpoint(genuine, checksums=True, tensors=True)  # the genuine one passes everything
    for name, variant in corpus.items():
        with pytest.raises(CHECKPOINT_ERRORS) as refused:
            check_checkpoint(variant.path, checksums=True, tensors=True)
        message = str(refused.value)
        assert str(variant.path) in message and variant.refusal in message, (name, message)
        if name.startswith("metadata:"):
            # The loader itself (DCP through the safe reader), not only the checks before it.
            with pytest.raises((UnsafeCheckpointError, BaseException)) as loaded:
                load_logical_tensors(variant.path)
            assert "refusing to load it" in str(loaded.value) or "not a shard file" in str(loaded.value), name


def test_genuine_metadata_round_trips_exactly(genuine):
    raw = (genuine / ".metadata").read_bytes()
    assert safe_load_metadata(raw) == pickle.loads(raw)


def _cli(*argv: str) -> tuple[int, str]:
    """``shardtune ARGV`` in this process (the payload, if it ran, would run here)."""
    from shardtune.cli import main

    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        code = main(list(argv))
    return code, out.getvalue()


def test_ckpt_verify_ls_inspect_refuse_every_variant(corpus, genuine):
    root = next(iter(corpus.values())).path.parent
    code, text = _cli("ckpt", "verify", str(root))
    assert code == 4, text
    for variant in corpus.values():
        line = next(line for line in text.splitlines() if str(variant.path) in line)
        assert line.startswith(("UNSAFE", "CORRUPT")) and variant.refusal in line, (variant.name, line)
    code, text = _cli("ckpt", "ls", str(root))
    # ls reads no tensor bytes (verify does): that one variant is "sizes ok", never plain "ok".
    assert code == 0 and text.count("UNSAFE") + text.count("INVALID") == len(corpus) - 1, text
    tensor_bytes = corpus["pickle in the tensor bytes"].path.name
    assert next(line for line in text.splitlines() if line.startswith(tensor_bytes)).endswith("sizes ok"), text
    code, text = _cli("ckpt", "inspect", str(corpus[ISSUE_VECTOR].path))
    assert code == 4 and REFUSED in text, text


@pytest.mark.parametrize("argv", [
    ("ckpt", "export", "{ckpt}", "{out}"),
    ("ckpt", "reshard", "{ckpt}", "{out}", "--world-size", "1"),
    ("eval", "{ckpt}"),
], ids=["export", "reshard", "eval"])
def test_offline_entry_points_refuse_the_issue_vector(corpus, tmp_path, argv):
    ckpt = corpus[ISSUE_VECTOR].path
    code, text = _cli(*(a.format(ckpt=ckpt, out=tmp_path / "out") for a in argv))
    assert code == 4, text
    assert f"shardtune: checkpoint error: {ckpt}/.metadata: references the global {REFUSED}" in text, text
    assert not (tmp_path / "out").exists()


@pytest.mark.distributed
@pytest.mark.parametrize("how", ["auto", "path"])
def test_training_resume_refuses_the_issue_vector(corpus, tmp_path, how):
    variant = corpus[ISSUE_VECTOR]
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    shutil.copytree(variant.path, ckpts / variant.path.name)
    resume = () if how == "auto" else (f"checkpoint.resume={ckpts / variant.path.name}",)
    run = run_shardtune(tmp_path, "train.max_steps=3", *resume, expect_ok=False)
    assert run.returncode == 4, run.stderr[-3000:]
    assert REFUSED in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert not (ckpts / "step-00000003").exists()  # nothing trained, nothing overwritten


def test_run_directory_readers_refuse_pickles(genuine, sentinel, tmp_path):
    """sweep --collect, report and data manifests read JSON only: a pickle there is a message."""
    classic = f"cos\nsystem\n(Vtouch {sentinel}\ntR.".encode()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "result.json").write_bytes(classic)
    code, text = _cli("report", str(run_dir))
    assert code == 2 and f"{run_dir / 'result.json'}: run result is not JSON" in text, text

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_bytes(classic)
    code, text = _cli("sweep", "--collect", str(sweep))
    assert code == 2 and "sweep plan is not JSON" in text, text

    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "manifest.json").write_bytes(classic)
    out = subprocess.run([sys.executable, "-m", "shardtune", "train", str(TINY), f"run.output_dir={tmp_path / 'o'}",
                          "data.source=prepared", f"data.prepared_dir={prepared}",
                          f"tokenizer.name_or_path={genuine / 'tokenizer'}"],
                         capture_output=True, text=True, env=run_env(), cwd=ROOT, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"{prepared / 'manifest.json'}: data manifest is not JSON" in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
