"""Offline checkpoint tools: read logical tensors in one process, export to Hugging Face."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from shardtune.checkpoint.safe_io import SafeFileSystemReader, TensorOnlyLoadPlanner, check_checkpoint
from shardtune.errors import CheckpointError
from shardtune.integrity import read_json_object


def load_logical_tensors(path: Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors whose key starts with ``prefix``, in this one process."""
    checked = check_checkpoint(path, checksums=False)  # the callers verified the hashes
    wanted = {k: v for k, v in checked.manifest["tensors"].items() if k.startswith(prefix)}
    if not wanted:
        raise CheckpointError(f"{path}: no tensors under {prefix!r}")
    dtypes = {key: meta.properties.dtype for key, meta in checked.metadata.state_dict_metadata.items()}
    flat = {k: torch.empty(shape, dtype=dtypes.get(k, torch.float32)) for k, shape in wanted.items()}
    # DCP flattens nested dicts with '.', and so do we: load into the flat keys directly.
    dcp.load(flat, storage_reader=SafeFileSystemReader(str(path)), planner=TensorOnlyLoadPlanner(), no_dist=True)
    return {k[len(prefix):]: v for k, v in flat.items()}


def read_finetune_metadata(path: Path) -> dict:
    """finetune.json of a checkpoint (task, labels, LoRA settings); causal-LM full fine-tuning if absent."""
    meta_file = path / "finetune.json"
    meta = read_json_object(meta_file, CheckpointError, "checkpoint file") if meta_file.is_file() else {}
    return {"task": "causal_lm", "strategy": "full", "lora": None, "label_names": None, **meta}


def export_hf(path: Path, out: Path, dtype: str = "float32", adapters_only: bool | None = None) -> Path:
    """Write a directory that ``AutoModelForCausalLM`` (or ``...ForSequenceClassification``)
    ``.from_pretrained`` loads: safetensors, config.json (with the KV cache re-enabled for
    generation) and the tokenizer. LoRA checkpoints are merged into plain weights, unless
    ``adapters_only`` (default: the run's ``finetune.lora.export``) writes PEFT adapters."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config_file = path / "model_config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no model_config.json; cannot rebuild the model for export")
    meta = read_finetune_metadata(path)
    auto = AutoModelForSequenceClassification if meta["task"] == "classification" else AutoModelForCausalLM
    config_dict = read_json_object(config_file, CheckpointError, "checkpoint file")
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    config.use_cache = True  # training disabled it for packed sequences; generation wants it
    lora = meta.get("lora") if meta.get("strategy") == "lora" else None
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(auto.from_config(config), LoraConfig(
            r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=lora["target_modules"],
        ))
        assign = False
    else:
        with torch.device("meta"):
            model = auto.from_config(config)
        assign = True
    weights = load_logical_tensors(path, "model.")
    expected = set(model.state_dict())
    missing = sorted(expected - set(weights))
    if missing:
        raise CheckpointError(f"{path}: the checkpoint lacks model tensor {missing[0]!r} ({len(missing)} missing)")
    target = getattr(torch, dtype)
    model.load_state_dict({k: v.to(target) for k, v in weights.items() if k in expected}, assign=assign, strict=True)
    out.mkdir(parents=True, exist_ok=True)
    if lora:
        if adapters_only if adapters_only is not None else lora.get("export") == "adapters":
            base = config_dict.get("_name_or_path") or None
            model.peft_config["default"].base_model_name_or_path = base
            model.save_pretrained(str(out))  # adapter_model.safetensors + adapter_config.json
            # The trained head (new for classification) is not a LoRA module: PEFT's adapter
            # file does not hold it, so it goes next to it, in the base model's names.
            head = {k.removeprefix("base_model.model."): v.contiguous() for k, v in weights.items()
                    if k in meta.get("head", [])}
            if head:
                from safetensors.torch import save_file

                save_file(head, str(out / "head.safetensors"))
            _copy_tokenizer(path, out)
            return out
        model = model.merge_and_unload()
    model.to(target)
    model.tie_weights()
    model.save_pretrained(str(out), safe_serialization=True)
    _copy_tokenizer(path, out)
    return out


def _copy_tokenizer(path: Path, out: Path) -> None:
    tokenizer_dir = path / "tokenizer"
    if tokenizer_dir.is_dir():
        for item in tokenizer_dir.iterdir():
            shutil.copy2(item, out / item.name)
