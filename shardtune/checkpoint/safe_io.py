"""Reading DCP checkpoints without unpickling arbitrary objects.

DCP stores its ``.metadata`` with plain ``pickle`` and loads non-tensor entries with
``torch.load(weights_only=False)``. A checkpoint is often downloaded from somewhere, so
shardtune reads metadata through an allow-listed unpickler and keeps every non-tensor value
(step, cursor, scheduler, config) in JSON next to the shards, never inside them.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from shardtune.errors import UnsafeCheckpointError

# Everything DCP's metadata legitimately references: its own dataclasses, torch sizes,
# dtypes and memory formats, and plain containers.
_ALLOWED_MODULE_PREFIXES = ("torch.distributed.checkpoint.",)
_ALLOWED = {
    ("torch", "Size"), ("collections", "OrderedDict"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "slice"),
    ("torch.serialization", "_get_layout"),  # maps "torch.strided" to the layout object
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),  # the checkpoint_id it was saved under
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = module.startswith(_ALLOWED_MODULE_PREFIXES) or (module, name) in _ALLOWED
        # dtypes and memory formats are module attributes of torch, not classes.
        if module == "torch" and (name.endswith("_format") or _is_dtype_name(name)):
            allowed = True
        if not allowed:
            raise UnsafeCheckpointError(
                f"checkpoint metadata references {module}.{name}, which a DCP checkpoint never "
                "needs; refusing to load it"
            )
        return super().find_class(module, name)


def _is_dtype_name(name: str) -> bool:
    import torch

    return isinstance(getattr(torch, name, None), torch.dtype)


def safe_load_metadata(raw: bytes) -> Metadata:
    return _RestrictedUnpickler(io.BytesIO(raw)).load()


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = safe_load_metadata(stream.read())
        if getattr(metadata, "storage_meta", None) is None:
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
