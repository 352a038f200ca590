"""Reading DCP checkpoints without running code from them.

DCP stores its ``.metadata`` with plain ``pickle``, and a checkpoint is often downloaded from
somewhere, so shardtune never hands that file to ``pickle.load``. It is read by an unpickler
that is safe by construction:

* ``GLOBAL``/``STACK_GLOBAL`` look a ``(module, qualname)`` pair up in ``ALLOWED_GLOBALS``, a
  table of objects imported here; nothing is imported or resolved through ``getattr``, so a
  dotted name (protocol 4 resolves ``"os.system"`` attribute by attribute) is just a key that
  is not in the table. The table is what pickling real DCP metadata of every strategy
  references (pinned by ``tests/faults/test_hostile_checkpoints.py``), plus torch dtypes and
  memory formats by exact name.
* ``REDUCE`` calls only the few callables the metadata needs (``torch.Size``, a path, a layout
  or memory-format lookup) and only with plain arguments; ``NEWOBJ`` creates only DCP's
  dataclasses, without arguments; ``BUILD`` fills only an instance of one of those with its
  own field names (never a class, never a dunder such as ``__setstate__``).
* Every other opcode that can call or import something (``INST``, ``OBJ``, ``NEWOBJ_EX``,
  ``EXT*``, persistent ids) is refused outright.

The result must then be a ``Metadata`` of tensor entries only whose storage files are plain
shard names. Non-tensor values (step, cursor, scheduler, config) live in JSON next to the
shards, and tensor bytes are read by DCP with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import re
from dataclasses import dataclass
from pathlib import Path, PosixPath
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    _MEM_FORMAT_ENCODING,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from shardtune.checkpoint.manifest import MANIFEST, TRAINER_STATE, verify_checkpoint
from shardtune.errors import CheckpointError, UnsafeCheckpointError
from shardtune.integrity import read_json_object

_DTYPE_NAMES = (
    "float64", "float32", "float16", "bfloat16", "complex64", "complex128", "uint8", "int8",
    "int16", "int32", "int64", "bool", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64",
)
_MEMORY_FORMAT_NAMES = ("contiguous_format", "channels_last", "channels_last_3d", "preserve_format")


def _layout_by_name(name: str) -> torch.layout:
    """Stands in for ``torch.serialization._get_layout``: the same answer, exact names only."""
    layouts = {str(v): v for v in (torch.strided, torch.sparse_coo, torch.sparse_csr)}
    if type(name) is not str or name not in layouts:
        raise UnsafeCheckpointError(f"unknown tensor layout {name!r}")
    return layouts[name]


# The dataclasses DCP's metadata is made of: created by NEWOBJ, filled by BUILD.
_DATACLASSES = (Metadata, StorageMeta, TensorStorageMetadata, TensorProperties, ChunkStorageMetadata,
                MetadataIndex, _StorageInfo)
# What REDUCE may call (with plain arguments): each returns a value object and nothing else.
_CALLABLES = (torch.Size, PosixPath, _layout_by_name, _MEM_FORMAT_ENCODING)

# (module, qualname) exactly as a real DCP ``.metadata`` spells it -> the object it stands for.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(cls.__module__, cls.__qualname__): cls for cls in _DATACLASSES},
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"): _MEM_FORMAT_ENCODING,
    ("torch", "Size"): torch.Size,
    ("pathlib", "PosixPath"): PosixPath,  # the checkpoint_id it was saved under
    ("torch.serialization", "_get_layout"): _layout_by_name,
    **{("torch", n): getattr(torch, n) for n in _DTYPE_NAMES + _MEMORY_FORMAT_NAMES if hasattr(torch, n)},
}
# The globals that name classes or functions (the rest are dtype and memory-format values).
CLASS_GLOBALS = frozenset(k for k, v in ALLOWED_GLOBALS.items() if not isinstance(v, (torch.dtype, torch.memory_format)))

_FIELDS = {cls: frozenset(f.name for f in dataclasses.fields(cls)) for cls in _DATACLASSES}
_PLAIN = (str, int, float, bool, type(None))
_SHARD_FILE = re.compile(r"^__\d+_\d+\.distcp$")


def _plain(value: Any, depth: int = 0) -> bool:
    if isinstance(value, (tuple, list)) and depth < 4:
        return all(_plain(v, depth + 1) for v in value)
    return type(value) in _PLAIN


class _MetadataUnpickler(pickle._Unpickler):  # the Python one: its opcode table can be replaced
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, raw: bytes, where: str):
        super().__init__(io.BytesIO(raw))
        self.where = where

    def refuse(self, what: str) -> None:
        raise UnsafeCheckpointError(
            f"{self.where}: {what}; a DCP checkpoint never needs it, refusing to load it "
            "(nothing in it was run)"
        )

    def find_class(self, module: str, name: str) -> Any:
        found = ALLOWED_GLOBALS.get((module, name)) if type(module) is str and type(name) is str else None
        if found is None:
            dotted = " (a dotted name, resolved attribute by attribute by pickle)" if "." in str(name) else ""
            self.refuse(f"references the global {module}.{name}{dotted}")
        return found

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if not any(func is allowed for allowed in _CALLABLES):
            self.refuse(f"calls {_name(func)}")
        if type(args) is not tuple or not _plain(args):
            self.refuse(f"calls {_name(func)} with non-plain arguments")
        try:
            self.stack[-1] = func(*args)
        except UnsafeCheckpointError:
            raise
        except Exception as exc:  # a malformed size or enum value: corrupt, and refused
            self.refuse(f"calls {_name(func)}{args!r}, which fails ({type(exc).__name__})")

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if not any(cls is allowed for allowed in _DATACLASSES) or args != ():
            self.refuse(f"creates {_name(cls)} with arguments {args!r}" if args != () else f"creates {_name(cls)}")
        self.append(cls.__new__(cls))

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        cls = type(inst)
        if not any(cls is allowed for allowed in _DATACLASSES):
            self.refuse(f"sets the state of {_name(inst)}")  # a class, a function, a path ...
        if cls is TensorProperties:  # pickled as a tuple through its own __setstate__
            if not (type(state) is tuple and len(state) == 5 and isinstance(state[0], torch.dtype)
                    and isinstance(state[1], torch.layout) and isinstance(state[3], _MEM_FORMAT_ENCODING)
                    and type(state[2]) is bool and type(state[4]) is bool):
                self.refuse(f"sets TensorProperties to {state!r}")
            TensorProperties.__setstate__(inst, state)
            return
        if type(state) is not dict or not all(type(k) is str and k in _FIELDS[cls] for k in state):
            self.refuse(f"sets {cls.__qualname__} attributes {sorted(map(str, state))[:5] if isinstance(state, dict) else state!r}"
                        " that are not its fields")
        inst.__dict__.update(state)



def _refuse_opcode(opcode: str):
    def refuse(unpickler: _MetadataUnpickler) -> None:
        unpickler.refuse(f"uses the pickle opcode {opcode}")
    return refuse


for _opcode, _opname in ((pickle.INST, "INST"), (pickle.OBJ, "OBJ"), (pickle.NEWOBJ_EX, "NEWOBJ_EX"),
                        (pickle.EXT1, "EXT1"), (pickle.EXT2, "EXT2"), (pickle.EXT4, "EXT4"),
                        (pickle.PERSID, "PERSID"), (pickle.BINPERSID, "BINPERSID")):
    _MetadataUnpickler.dispatch[_opcode[0]] = _refuse_opcode(_opname)
_MetadataUnpickler.dispatch[pickle.REDUCE[0]] = _MetadataUnpickler.load_reduce
_MetadataUnpickler.dispatch[pickle.NEWOBJ[0]] = _MetadataUnpickler.load_newobj
_MetadataUnpickler.dispatch[pickle.BUILD[0]] = _MetadataUnpickler.load_build


def _name(obj: Any) -> str:
    if isinstance(obj, type) or callable(obj):
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"
    return f"a {type(obj).__qualname__}"


def safe_load_metadata(raw: bytes, where: str | Path = ".metadata") -> Metadata:
    """DCP metadata from bytes, or ``UnsafeCheckpointError`` naming ``where`` and the reason."""
    where = str(where)
    try:
        metadata = _MetadataUnpickler(raw, where).load()
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # truncated, garbage, a stack mismatch
        raise UnsafeCheckpointError(f"{where}: not a readable DCP metadata file ({type(exc).__name__}: {exc})") from None
    check_metadata(metadata, where)
    return metadata


def check_metadata(metadata: Any, where: str) -> None:
    """Tensor entries only, stored in plain shard files of this directory, with no transforms."""
    if type(metadata) is not Metadata or type(metadata.state_dict_metadata) is not dict:
        raise UnsafeCheckpointError(f"{where}: holds {_name(metadata)}, not DCP metadata")
    for key, entry in metadata.state_dict_metadata.items():
        if type(entry) is not TensorStorageMetadata:
            raise UnsafeCheckpointError(
                f"{where}: entry {key!r} is not a tensor ({_name(entry)}); shardtune checkpoints hold tensors only"
            )
    storage = metadata.storage_data
    if type(storage) is not dict:
        raise UnsafeCheckpointError(f"{where}: storage index is {_name(storage)}, not a dict")
    for index, info in storage.items():
        if type(index) is not MetadataIndex or type(info) is not _StorageInfo:
            raise UnsafeCheckpointError(f"{where}: storage index holds {_name(index)} -> {_name(info)}")
        if type(info.relative_path) is not str or not _SHARD_FILE.match(info.relative_path):
            raise UnsafeCheckpointError(
                f"{where}: tensor {index.fqn!r} is stored in {info.relative_path!r}, not a shard file of "
                "this directory"
            )
        if getattr(info, "transform_descriptors", None):
            raise UnsafeCheckpointError(f"{where}: tensor {index.fqn!r} asks for storage transforms "
                                        f"{info.transform_descriptors!r}, which shardtune never writes")


def read_metadata_file(directory: Path) -> Metadata:
    path = Path(directory) / ".metadata"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UnsafeCheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    return safe_load_metadata(raw, path)


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = safe_load_metadata(stream.read(), path)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorOnlyLoadPlanner(DefaultLoadPlanner):
    """Loads tensors only: a pickled value inside a checkpoint is an error, never executed."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        raise UnsafeCheckpointError(
            f"checkpoint entry {read_item.dest_index.fqn!r} is a pickled object; shardtune "
            "checkpoints hold tensors only"
        )


# Files a checkpoint may hold besides its shards and JSON: tokenizer vocabularies and merges.
_CODE_OR_PICKLE = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".npy", ".npz", ".py", ".pyc", ".so")


@dataclass(frozen=True)
class CheckedCheckpoint:
    """A checkpoint that passed every check the loader makes; what it read on the way."""

    path: Path
    manifest: dict
    metadata: Metadata
    trainer_state: dict


def check_checkpoint(path: Path, *, checksums: bool = True, tensors: bool = False) -> CheckedCheckpoint:
    """Every safety and integrity check a load makes, without loading: manifest and file sizes
    (and sha256 with ``checksums``), ``.metadata`` through the safe unpickler, tensor entries
    only and all stored in shard files the manifest covers, every JSON file strict JSON, no
    pickle or code files; with ``tensors`` also every stored tensor read back the way DCP
    reads it (``torch.load(weights_only=True)``). ``ckpt verify``, ``inspect``, resume, export,
    reshard and eval all go through here, so "ok" means loadable and safe."""
    path = Path(path)
    manifest = verify_checkpoint(path, checksums=checksums)
    files = manifest["files"]
    for rel in files:
        if rel.lower().endswith(_CODE_OR_PICKLE):
            raise UnsafeCheckpointError(f"{path / rel}: a {Path(rel).suffix} file, which shardtune never "
                                        "writes into a checkpoint (pickles and code are refused)")
    if ".metadata" not in files or TRAINER_STATE not in files:
        missing = ".metadata" if ".metadata" not in files else TRAINER_STATE
        raise CheckpointError(f"{path / MANIFEST}: does not list {missing}")
    metadata = read_metadata_file(path)
    for index, info in metadata.storage_data.items():
        if info.relative_path not in files:
            raise UnsafeCheckpointError(f"{path / '.metadata'}: tensor {index.fqn!r} is stored in "
                                        f"{info.relative_path}, which the manifest does not cover")
    shapes = {k: list(v.size) for k, v in metadata.state_dict_metadata.items()}
    if shapes != manifest.get("tensors"):
        theirs = manifest.get("tensors") or {}
        differ = sorted(k for k in set(shapes) | set(theirs) if shapes.get(k) != theirs.get(k))
        raise CheckpointError(f"{path}: the manifest's tensors differ from .metadata's "
                              f"(first: {differ[:1] or 'a shape'})")
    state = {}
    for rel in sorted(files):
        if rel.endswith(".json"):
            value = read_json_object(path / rel, CheckpointError, "checkpoint file")
            if rel == TRAINER_STATE:
                state = value
    if tensors:
        check_tensor_bytes(path, metadata)
    return CheckedCheckpoint(path, manifest, metadata, state)


def check_tensor_bytes(path: Path, metadata: Metadata) -> None:
    """Read every stored tensor back as DCP's reader does; a pickle there is refused, not run."""
    by_file: dict[str, list] = {}
    for index, info in metadata.storage_data.items():
        by_file.setdefault(info.relative_path, []).append((info.offset, info.length, index.fqn))
    for rel, items in sorted(by_file.items()):
        with (path / rel).open("rb") as fh:
            for offset, length, fqn in sorted(items):
                fh.seek(offset)
                raw = fh.read(length)
                try:
                    value = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
                except pickle.UnpicklingError as exc:
                    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
                    first = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")
                    raise UnsafeCheckpointError(
                        f"{path / rel}: the bytes of tensor {fqn!r} are refused by the weights-only "
                        f"reader ({first})") from None
                except Exception as exc:  # noqa: BLE001 - any other way of not being a tensor
                    raise CheckpointError(f"{path / rel}: the bytes of tensor {fqn!r} are unreadable "
                                          f"({type(exc).__name__}: {str(exc)[:200]})") from None
                if not isinstance(value, torch.Tensor):
                    raise UnsafeCheckpointError(f"{path / rel}: entry {fqn!r} holds a {type(value).__name__}, "
                                                "not a tensor")
