"""Hostile checkpoints, generated at test time from one genuine checkpoint (nothing committed).

Each variant is a copy of the genuine step directory with one file replaced by crafted bytes,
and its ``manifest.json`` re-hashed to match, as a downloaded checkpoint would be: checksums
pass, so only the safe reader stands between the bytes and the payload. Every payload creates
the same sentinel file; a test that sees it has run attacker code.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from shardtune.integrity import sha256_file

# The modules of the allow-list; a dotted name under each is tried (protocol 4 would resolve
# "os.system" below any module that imports os).
ALLOWED_MODULES = ("torch", "torch.serialization", "pathlib", "torch.distributed.checkpoint.metadata",
                   "torch.distributed.checkpoint.filesystem")


@dataclass(frozen=True)
class Variant:
    name: str
    path: Path
    refusal: str  # a fragment the refusal must contain


def _u(text: str) -> bytes:  # SHORT_BINUNICODE / BINUNICODE
    raw = text.encode()
    return (b"\x8c" + bytes([len(raw)]) if len(raw) < 256 else b"X" + struct.pack("<I", len(raw))) + raw


def _global(module: str, name: str, stack: bool) -> bytes:
    return _u(module) + _u(name) + b"\x93" if stack else b"c" + f"{module}\n{name}\n".encode()


def _call(module: str, name: str, args: bytes, stack: bool = True) -> bytes:
    """module.name(*args) then POP: the unpickler goes on as if nothing happened."""
    return _global(module, name, stack) + args + b"R0"


def payloads(sentinel: Path) -> dict[str, bytes]:
    """Opcode sequences that create ``sentinel`` if an unpickler lets them run."""
    cmd = f"touch {sentinel}"
    touch = _u(cmd) + b"\x85"  # (cmd,)
    popen = _u("touch") + _u(str(sentinel)) + b"\x86\x85"  # (("touch", path),)
    evil = {
        f"{kind}-{mod}.{name}": _call(mod, name, args, stack=kind == "STACK_GLOBAL")
        for kind in ("GLOBAL", "STACK_GLOBAL")
        for mod, name, args in (("os", "system", touch), ("posix", "system", touch),
                                ("builtins", "eval", _u(f"open({str(sentinel)!r}, 'w').close()") + b"\x85"),
                                ("subprocess", "Popen", popen))
    }
    for module in ALLOWED_MODULES:
        evil[f"dotted-{module}:os.system"] = _call(module, "os.system", touch)
    meta = "torch.distributed.checkpoint.metadata"
    evil.update({
        # protocol-0/1 calls: INST and OBJ instantiate whatever they name, allowed class or not
        "INST-os.system": b"(" + _u(cmd) + b"ios\nsystem\n0",
        "INST-allowed-StorageMeta": b"(" + f"i{meta}\nStorageMeta\n0".encode(),
        "OBJ-os.system": b"(" + _global("os", "system", True) + _u(cmd) + b"o0",
        "OBJ-allowed-StorageMeta": b"(" + _global(meta, "StorageMeta", True) + b"o0",
        # REDUCE / NEWOBJ with an allowed class and made-up arguments
        "REDUCE-allowed-Metadata": _call(meta, "Metadata", _u(cmd) + b"\x85"),
        "REDUCE-Size-of-a-class": _call("torch", "Size", _global(meta, "Metadata", True) + b"\x85"),
        "NEWOBJ-allowed-with-args": _global(meta, "StorageMeta", True) + _u(cmd) + b"\x85\x81" + b"0",
        # BUILD: plant __setstate__ on an allowed instance, then BUILD it again to call it
        "BUILD-__setstate__=os.system(dotted)": (
            _global(meta, "StorageMeta", True) + b")\x81" + b"}" + _u("__setstate__")
            + _global(meta, "os.system", True) + b"sb" + _u(cmd) + b"b0"),
        "BUILD-__setstate__=allowed-callable": (
            _global(meta, "StorageMeta", True) + b")\x81" + b"}" + _u("__setstate__")
            + _global("pathlib", "PosixPath", True) + b"sb" + _u(cmd) + b"b0"),
        # BUILD on a class object: its slot state is setattr()ed onto the class itself
        "BUILD-on-a-class": (
            _global(meta, "StorageMeta", True) + b"N}" + _u("__reduce__")
            + _global("pathlib", "PosixPath", True) + b"s\x86b0"),
        "EXT-registry": b"\x82\x01" + b"0",
        "PERSID": b"P" + cmd.encode() + b"\n0",
    })
    return evil


def _rehash(directory: Path) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    for rel, entry in manifest["files"].items():
        file = directory / rel
        entry.update(bytes=file.stat().st_size, sha256=sha256_file(file))
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))


def build_corpus(genuine: Path, root: Path, sentinel: Path) -> list[Variant]:
    """Every hostile variant as ``root/step-NNNNNNNN`` (a checkpoints directory ``ckpt verify`` walks)."""
    root.mkdir(parents=True, exist_ok=True)
    raw = (genuine / ".metadata").read_bytes()
    assert raw[:2] == b"\x80\x04", "DCP metadata is expected to be pickle protocol 4"
    variants: list[Variant] = []

    def add(name: str, refusal: str, mutate) -> None:
        path = root / f"step-{len(variants) + 100:08d}"
        shutil.copytree(genuine, path)
        mutate(path)
        _rehash(path)
        variants.append(Variant(name, path, refusal))

    for name, ops in payloads(sentinel).items():
        # payload, POP, then the genuine metadata: a lax unpickler runs it and loads normally
        hostile = b"\x80\x04" + ops + raw[2:]
        refusal = "references the global" if "GLOBAL" in name or "dotted" in name else "refusing"
        add(f"metadata:{name}", refusal, lambda p, h=hostile: (p / ".metadata").write_bytes(h))

    genuine_md = pickle.loads(raw)  # our own genuine file: safe to load with pickle here
    add("metadata:BytesStorageMetadata entry", "BytesStorageMetadata",
        lambda p: (p / ".metadata").write_bytes(_with_bytes_entry(genuine_md)))
    add("metadata:storage path outside the directory", "not a shard file",
        lambda p: (p / ".metadata").write_bytes(_with_relative_path(genuine_md, "../../../../etc/passwd")))
    classic = f"cos\nsystem\n(V{'touch ' + str(sentinel)}\ntR.".encode()  # pickle protocol 0
    for rel in ("trainer_state.json", "rng/rank-00000.json", "model_config.json", "finetune.json"):
        add(f"pickle in place of {rel}", "not JSON", lambda p, r=rel: (p / r).write_bytes(classic))
    add("pickle in the tensor bytes", "weights", lambda p: _pickle_into_tensor_bytes(p, genuine_md, classic))
    return variants


def _with_bytes_entry(metadata) -> bytes:
    import copy

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    md = copy.deepcopy(metadata)
    md.state_dict_metadata["evil"] = BytesStorageMetadata()
    return pickle.dumps(md, protocol=4)


def _with_relative_path(metadata, rel: str) -> bytes:
    import copy

    md = copy.deepcopy(metadata)
    first = next(iter(md.storage_data))
    md.storage_data[first].relative_path = rel
    return pickle.dumps(md, protocol=4)


def _pickle_into_tensor_bytes(path: Path, metadata, payload: bytes) -> None:
    """Overwrite the first tensor's stored bytes with a pickle (padded to the same length)."""
    info = next(iter(metadata.storage_data.values()))
    shard = path / info.relative_path
    data = bytearray(shard.read_bytes())
    assert len(payload) <= info.length
    data[info.offset:info.offset + info.length] = payload + b"\0" * (info.length - len(payload))
    shard.write_bytes(bytes(data))
