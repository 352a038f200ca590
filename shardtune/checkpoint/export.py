"""Offline checkpoint tools: read logical tensors in one process, export to Hugging Face."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from shardtune.checkpoint.manifest import CheckpointError, read_manifest
from shardtune.checkpoint.safe_io import SafeFileSystemReader, TensorOnlyLoadPlanner


def load_logical_tensors(path: Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors whose key starts with ``prefix``, in this one process."""
    manifest = read_manifest(path)
    wanted = {k: v for k, v in manifest["tensors"].items() if k.startswith(prefix)}
    if not wanted:
        raise CheckpointError(f"{path}: no tensors under {prefix!r}")
    dtypes = _saved_dtypes(path)
    flat = {k: torch.empty(shape, dtype=dtypes.get(k, torch.float32)) for k, shape in wanted.items()}
    # DCP flattens nested dicts with '.', and so do we: load into the flat keys directly.
    dcp.load(flat, storage_reader=SafeFileSystemReader(str(path)), planner=TensorOnlyLoadPlanner(), no_dist=True)
    return {k[len(prefix):]: v for k, v in flat.items()}


def _saved_dtypes(path: Path) -> dict[str, torch.dtype]:
    from shardtune.checkpoint.safe_io import safe_load_metadata

    metadata = safe_load_metadata((path / ".metadata").read_bytes())
    return {
        key: meta.properties.dtype
        for key, meta in metadata.state_dict_metadata.items()
        if hasattr(meta, "properties")
    }


def export_hf(path: Path, out: Path, dtype: str = "float32") -> Path:
    """Write a directory that ``AutoModelForCausalLM.from_pretrained`` loads: safetensors,
    config.json (with the KV cache re-enabled for generation) and the tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_file = path / "model_config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no model_config.json; cannot rebuild the model for export")
    config_dict = json.loads(config_file.read_text())
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    config.use_cache = True  # training disabled it for packed sequences; generation wants it
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    weights = load_logical_tensors(path, "model.")
    expected = set(model.state_dict())
    missing = sorted(expected - set(weights))
    if missing:
        raise CheckpointError(f"{path}: the checkpoint lacks model tensor {missing[0]!r} ({len(missing)} missing)")
    target = getattr(torch, dtype)
    model.load_state_dict({k: v.to(target) for k, v in weights.items() if k in expected}, assign=True, strict=True)
    model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer_dir = path / "tokenizer"
    if tokenizer_dir.is_dir():
        for item in tokenizer_dir.iterdir():
            shutil.copy2(item, out / item.name)
    return out
