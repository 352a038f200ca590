"""Read only this rank's part of each tensor from a Hugging Face safetensors checkpoint.

A safetensors file is an 8-byte header length, a JSON header (dtype, shape, byte offsets per
tensor) and the raw, row-major tensor bytes. Any range of a tensor's flattened elements is
therefore one contiguous byte range: a dim-0 shard (FSDP2) and a flat partition (ZeRO-3)
are both a single ``pread``, straight into the destination when the dtypes agree. Nothing
is memory-mapped, so a rank's resident memory holds its own shards and no page of anyone
else's (mapped pages of a read-only mmap count in each rank's RSS until it is unmapped; a
1/W shard read through ``safe_open`` slices left the whole file mapped in every rank).

``bench/loading.py`` compares this with ``safe_open(...).get_slice`` and with
``torch.distributed.checkpoint.HuggingFaceStorageReader``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from shardtune.config import ModelSection
from shardtune.models.loading import apply_activation_checkpointing, model_class_and_config
from shardtune.models.meta_init import InitRecorder, InitValues, build_meta, record_missing_init

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# Reads through a temporary buffer (dtype conversion) go in pieces of this many bytes, so a
# bf16 checkpoint loaded into fp32 weights never holds a second full copy of a tensor.
CONVERT_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class StoredTensor:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of element 0 in the file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> dict[str, StoredTensor]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    tensors = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        tensors[key] = StoredTensor(path, DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                    8 + length + entry["data_offsets"][0])
    return tensors


def checkpoint_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / name for name in names]
    return sorted(directory.glob("*.safetensors"))


class SafetensorsCheckpoint:
    """The tensors of every ``*.safetensors`` file of a Hugging Face model directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        files = checkpoint_files(self.directory)
        if not files:
            raise FileNotFoundError(f"{self.directory}: no *.safetensors files")
        self.tensors: dict[str, StoredTensor] = {}
        for path in files:
            self.tensors.update(read_header(path))
        self._fds: dict[Path, int] = {}

    def keys(self) -> set[str]:
        return set(self.tensors)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def read_flat(self, key: str, start: int, out: torch.Tensor) -> None:
        """Fill the contiguous ``out`` with elements ``start .. start + out.numel()`` of the
        flattened tensor ``key``, converting to ``out.dtype``."""
        stored = self.tensors[key]
        count = out.numel()
        if start < 0 or start + count > stored.numel:
            raise ValueError(f"{key}: elements {start}..{start + count} outside {stored.shape}")
        if not out.is_contiguous() or out.device.type != "cpu":
            staging = torch.empty(count, dtype=out.dtype)
            self.read_flat(key, start, staging)
            out.copy_(staging.view(out.shape))
            return
        item = stored.dtype.itemsize
        fd, offset = self._fd(stored.path), stored.begin + start * item
        if stored.dtype == out.dtype:
            _pread_into(fd, out.view(-1).view(torch.uint8), offset)
            return
        flat = out.view(-1)
        step = max(1, CONVERT_CHUNK_BYTES // item)
        for first in range(0, count, step):
            n = min(step, count - first)
            raw = torch.empty(n * item, dtype=torch.uint8)
            _pread_into(fd, raw, offset + first * item)
            flat[first:first + n].copy_(raw.view(stored.dtype))


def _pread_into(fd: int, buffer: torch.Tensor, offset: int) -> None:
    view = memoryview(buffer.numpy()).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"short read at byte {offset + done}")
        done += got


def checkpoint_key(name: str, keys: set[str], base_prefix: str) -> str | None:
    """The checkpoint key of a model tensor: the same name, or the name with the base
    model's prefix added or dropped (a ``LlamaModel`` checkpoint in a ``LlamaForCausalLM``)."""
    if name in keys:
        return name
    if base_prefix and name.startswith(base_prefix + ".") and name[len(base_prefix) + 1:] in keys:
        return name[len(base_prefix) + 1:]
    if base_prefix and f"{base_prefix}.{name}" in keys:
        return f"{base_prefix}.{name}"
    return None


def peak_host_memory_mib() -> float:
    """This process's peak resident set (VmHWM) since start or the last ``reset_peak``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_host_memory() -> None:
    """Start VmHWM again from the current RSS (Linux: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def tensor_names(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


class ModelWeights:
    """Where each tensor of a meta-built model gets its values: a checkpoint key, or the
    replayed initialisation (a model from a config; a checkpoint's missing head and
    non-persistent buffers)."""

    def __init__(self, model: torch.nn.Module, recorder: InitRecorder, checkpoint: SafetensorsCheckpoint | None) -> None:
        self.model = model
        self.checkpoint = checkpoint
        self.keys: dict[str, str] = {}
        if checkpoint is not None:
            keys, prefix = checkpoint.keys(), getattr(model, "base_model_prefix", "")
            for name, _ in tensor_names(model):
                key = checkpoint_key(name, keys, prefix)
                if key is not None:
                    self.keys[name] = key
        self.init_names = {name for name, _ in tensor_names(model)} - set(self.keys)
        self.init = InitValues(model, recorder)

    def load_into(self, target: torch.nn.Module, local_view) -> None:
        """``local_view(name, tensor) -> (start, out)``: this rank keeps the flattened
        elements ``start .. start + out.numel()`` of ``name`` in ``out``."""
        tensors = dict(tensor_names(target))
        unknown = set(tensors) ^ {name for name, _ in tensor_names(self.model)}
        if unknown:
            raise ValueError(f"model and its meta build disagree on tensors {sorted(unknown)[:5]}")
        with torch.no_grad():
            for name, key in self.keys.items():
                start, out = local_view(name, tensors[name])
                if out.numel():
                    self.checkpoint.read_flat(key, start, out)
            for group in self.init.groups(self.init_names):
                for name, full in group.items():
                    start, out = local_view(name, tensors[name])
                    part = full.reshape(-1)[start:start + out.numel()]
                    out.copy_(part.view(out.shape))
        if self.checkpoint is not None:
            self.checkpoint.close()


class NotShardable(Exception):
    """This model cannot be built on meta; the strategy loads it in full instead."""


def local_checkpoint_dir(cfg: ModelSection, path: str) -> Path:
    """A directory with the checkpoint's safetensors files: the path itself, or the hub
    snapshot (from the local cache when HF_HUB_OFFLINE is set)."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, revision=cfg.revision, allow_patterns=["*.json", "*.safetensors"]))


def build_meta_model(
    cfg: ModelSection, tokenizer, *, task: str = "causal_lm", label_names: list[str] | None = None,
    dropout: float | None = None,
) -> tuple[torch.nn.Module, ModelWeights]:
    """``build_model``'s model on the meta device, and where its values come from.

    Call it where ``build_model`` would be called (after ``torch.manual_seed``): the
    generator advances as the full build would, so later draws (dropout, data) match too.
    """
    auto, config, path = model_class_and_config(cfg, tokenizer, task=task, label_names=label_names, dropout=dropout)
    checkpoint = None
    if path is not None:
        if str(path).endswith(".gguf"):
            raise NotShardable("a GGUF file is converted in full (models.loading)")
        directory = local_checkpoint_dir(cfg, path)
        if not checkpoint_files(directory):
            raise NotShardable(f"{directory} has no safetensors files")
        checkpoint = SafetensorsCheckpoint(directory)
    kwargs = dict(attn_implementation=cfg.attn_implementation, dtype=torch.float32,
                  trust_remote_code=cfg.trust_remote_code)
    model, recorder = build_meta(auto, config, replay_init=checkpoint is None, **kwargs)
    weights = ModelWeights(model, recorder, checkpoint)
    if checkpoint is not None:
        missing = [n for n in weights.init_names if n in dict(model.named_parameters())
                   and n.startswith(getattr(model, "base_model_prefix", "") + ".")]
        if missing:
            raise ValueError(
                f"{directory}: the checkpoint has no tensor for {sorted(missing)[:4]} (of {len(missing)}); "
                "its keys may need a conversion that only from_pretrained applies: use distributed.strategy=ddp"
            )
        record_missing_init(model, set(weights.keys), recorder)
    model.config.use_cache = False  # as build_model: packed documents must not see each other
    apply_activation_checkpointing(model, cfg)
    return model, weights


def on_meta(model: torch.nn.Module) -> bool:
    return any(t.is_meta for _, t in tensor_names(model))
