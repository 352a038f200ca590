"""The run's name and output directory, the model and its tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from shardtune.config.base import Section


class RunSection(Section):
    name: str = "run"
    output_dir: str = "runs/${run.name}"
    seed: int = 1234


def _existing_local_path(spec: str | None) -> str | None:
    """A name that can only be a local path (absolute, ./, ../, ~, a .gguf file, or more than one
    '/') must exist: else transformers answers "Repo id must be in the form ..." from deep inside."""
    if spec is None or spec.startswith("pkg:") or Path(spec).expanduser().exists():
        return spec
    if spec.startswith(("/", "./", "../", "~")) or spec.endswith(".gguf") or spec.count("/") > 1:
        raise ValueError(f"no such file or directory: {spec}")
    return spec  # a hub id such as org/name


class ModelSection(Section):
    name_or_path: str | None = None
    """Either a local directory / hub id loaded with from_pretrained ..."""
    config: dict[str, Any] | None = None
    """... or a transformers config (``model_type`` plus its kwargs) for a randomly initialised model."""
    trust_remote_code: bool = False
    revision: str | None = None
    attn_implementation: str = "sdpa"
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute activations in backward instead of keeping them: none; full (every transformer block);
    selective (every ``activation_checkpointing_every``-th block, the rest keep theirs: less recompute
    where memory allows). true/false mean full/none.
    """
    activation_checkpointing_every: int = Field(2, ge=2)

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _checkpointing_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # configs written before the policies existed
            return "full" if value else "none"
        return value

    @field_validator("name_or_path")
    @classmethod
    def _local_model_exists(cls, value: str | None) -> str | None:
        return _existing_local_path(value)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.name_or_path is None) == (self.config is None):
            raise ValueError("set exactly one of model.name_or_path or model.config")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("model.config needs a 'model_type' key (e.g. llama)")
        return self


class TokenizerSection(Section):
    name_or_path: str | None = None
    """A local directory / hub id; None means "train a byte-level BPE on the run's text"."""
    vocab_size: int = Field(2048, ge=260)

    @field_validator("name_or_path")
    @classmethod
    def _local_tokenizer_exists(cls, value: str | None) -> str | None:
        return _existing_local_path(value)
