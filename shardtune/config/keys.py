"""The config's key space: every dotted key, its type, default and docstring, and the nearest
valid key to a misspelt one."""

from __future__ import annotations

import difflib
import inspect
import json
import re

from pydantic import BaseModel

from shardtune.config.run import RunConfig
from shardtune.errors import ConfigError


def _valid_keys(model_cls: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model_cls.model_fields.items():
        path = f"{prefix}{name}"
        keys.append(path)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_valid_keys(annotation, path + "."))
    return keys


def _field_at(path: str):
    """(section class that holds the key, its FieldInfo) for a dotted key such as ``train.lr``."""
    cls, field = RunConfig, None
    for part in path.split("."):
        if cls is None or part not in cls.model_fields:
            hint = nearest_key(path)
            raise ConfigError(f"unknown key {path!r}" + (f" (did you mean {hint!r}?)" if hint else ""))
        field = cls.model_fields[part]
        owner = cls
        annotation = field.annotation
        cls = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return owner, field


def _type_name(annotation) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    # A section inside a generic is named where users import it from (shardtune.config.X), not by
    # the submodule that defines it: the key space must not move when a class changes module.
    return text or re.sub(r"\bshardtune\.config\.\w+\.", "shardtune.config.",
                          str(annotation).replace("typing.", ""))


def explain_key(path: str) -> str:
    """What ``shardtune config show --explain KEY`` prints: type, default and the field's docstring."""
    owner, field = _field_at(path)
    annotation = field.annotation
    lines = [f"{path}: {_type_name(annotation)}"]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        lines.append("  a section with keys: " + ", ".join(annotation.model_fields))
        doc = inspect.cleandoc(annotation.__doc__ or "")
    else:
        default = field.get_default(call_default_factory=True)
        lines.append(f"  default: {json.dumps(default, default=str)}")
        doc = field.description or ""
    lines += ["  " + line for line in (doc or "(no description)").splitlines()]
    return "\n".join(lines)


def key_space() -> list[str]:
    """Every config key with its type and default, one per line: what the snapshot test pins."""
    out = []
    for key in _valid_keys(RunConfig):
        _, field = _field_at(key)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out.append(f"{key}: section")
        else:
            out.append(f"{key}: {_type_name(annotation)} = "
                       f"{json.dumps(field.get_default(call_default_factory=True), default=str)}")
    return out


def nearest_key(path: str) -> str | None:
    candidates = _valid_keys(RunConfig)
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    siblings = [k for k in candidates if k.rsplit(".", 1)[0] == parent] if parent else candidates
    for pool in (siblings, candidates):
        match = difflib.get_close_matches(path, pool, n=1, cutoff=0.6)
        if match:
            return match[0]
    return None
