"""YAML file + dotted CLI overrides -> validated ``RunConfig``, and back to YAML."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from shardtune.config.keys import nearest_key
from shardtune.config.run import RunConfig
from shardtune.errors import ConfigError


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            hint = nearest_key(path)
            lines.append(
                f"  unknown key '{path}'" + (f" (did you mean '{hint}'?)" if hint else "")
            )
        elif e["type"] == "missing":
            lines.append(f"  missing required key '{path}'")
        else:
            where = f"'{path}'" if path else "(top level)"
            got = e.get("input")
            got_text = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {where}: {e['msg']}{got_text}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    # YAML scalars give the type coercion users expect: 3e-4, true, null, [1, 2].
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                prefix = ".".join(path[: depth + 1])
                raise ConfigError(f"override {text!r}: '{prefix}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def _budget_from_command_line(data: dict[str, Any], overrides: list[str]) -> None:
    """An override of train.epochs replaces the file's max_steps (and the other way round).

    Otherwise ``sweep --grid train.epochs=1,3`` on a config with ``max_steps: 40`` stops every
    run at step 40. Setting both on the command line keeps both (epochs, capped by max_steps).
    """
    given = {o.split("=", 1)[0] for o in overrides}
    train = data.get("train")
    if not isinstance(train, dict):
        return
    for key, other in (("epochs", "max_steps"), ("max_steps", "epochs")):
        if f"train.{key}" in given and f"train.{other}" not in given and train.get(key) is not None:
            train.pop(other, None)


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] = (), *,
                source: str | None = None) -> RunConfig:
    """Load a YAML config (or the embedded demo default when ``path`` is None).

    ``source`` names the config in error messages when ``path`` is not what the user gave
    (a config recovered from a checkpoint into a temporary file).
    """
    if path is None:
        source = source or "(no config file given: the built-in demo config with the command-line overrides)"
        path = default_config_path()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    data = apply_overrides(data, list(overrides))
    _budget_from_command_line(data, list(overrides))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source or str(path))) from None


def default_config_path() -> Path:
    """The embedded default: the CPU demo shipped inside the package."""
    return Path(__file__).parents[1] / "configs" / "demo-cpu.yaml"


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
