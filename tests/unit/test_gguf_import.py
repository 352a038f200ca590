"""GGUF import: the imported directory holds the GGUF file's de-quantised weights, bad files are named,
and the hash-keyed cache imports once however many processes ask at the same time."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMOLLM2_GGUF, run_env

from shardtune.errors import ModelImportError
from shardtune.models import gguf
from shardtune.models.loading import resolve_pretrained

PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


# GGUF's llama tensor names -> transformers' (blk.N.* -> model.layers.N.*).
GGUF_TO_HF = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}


def _hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    _, block, kind, suffix = gguf_name.split(".")
    return f"model.layers.{block}.{GGUF_TO_HF[kind]}.{suffix}"


@pytest.mark.slow
def test_imported_directory_holds_the_gguf_files_dequantised_weights(smollm2_dir):
    """Every tensor of the file, de-quantised by the gguf package's own reference code, is the
    imported model's tensor; the imported model answers like the instruction-tuned model."""
    import gguf as gguf_package
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf.locate(SMOLLM2_GGUF)
    note = gguf.read_provenance(smollm2_dir)
    assert note["sha256"] == gguf.file_digest(path) and note["parameters"] == 134_515_008
    assert note["source"] == SMOLLM2_GGUF and note["architecture"] == "LlamaForCausalLM"

    imported = load_file(str(smollm2_dir / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in imported.values())
    reader = gguf_package.GGUFReader(str(path))
    tensors = reader.tensors
    assert len(tensors) == 272 and set(imported) - {"lm_head.weight"} == {_hf_name(t.name) for t in tensors}
    for tensor in tensors:
        want = torch.from_numpy(gguf_package.quants.dequantize(tensor.data, tensor.tensor_type).copy())
        got = imported[_hf_name(tensor.name)]
        assert got.shape == want.shape, tensor.name
        if tensor.name.split(".")[-2] in ("attn_q", "attn_k"):
            # GGUF stores q and k with their rotary halves interleaved; the import undoes that
            # (a row permutation), so the values match as a multiset. The answer below checks the order.
            assert torch.equal(got.flatten().sort().values, want.flatten().sort().values), tensor.name
        else:
            assert torch.equal(got, want), tensor.name

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    # The tokenizer is the file's: every token string at its id, the special ids, the chat template.
    def field(key):
        f = reader.fields[key]
        return [f.parts[i] for i in f.data]

    vocabulary = [bytes(part).decode() for part in field("tokenizer.ggml.tokens")]
    assert len(vocabulary) == len(tokenizer) == 49_152
    assert tokenizer.convert_ids_to_tokens(list(range(len(vocabulary)))) == vocabulary
    assert tokenizer.eos_token_id == int(field("tokenizer.ggml.eos_token_id")[0][0])
    assert tokenizer.chat_template == bytes(field("tokenizer.chat_template")[0]).decode()
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    assert "quantization_config" not in model.config.to_dict()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as in the file
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def _copy_prefix(src: Path, dst: Path, size: int) -> Path:
    with src.open("rb") as fh:
        dst.write_bytes(fh.read(size))
    return dst


def test_corrupt_or_truncated_gguf_is_an_error_naming_the_file(tmp_path):
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ModelImportError, match=f"{not_gguf}: not a GGUF file"):
        gguf.import_gguf(not_gguf, tmp_path / "out")
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ModelImportError, match=f"{header_only}: truncated GGUF file"):
        gguf.cached_import(header_only, tmp_path / "cache")
    with pytest.raises(ModelImportError, match="GGUF file not found"):
        resolve_pretrained(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelImportError, match="not installed"):
        resolve_pretrained("pkg:no_such_package_here/model.gguf")
    assert not (tmp_path / "out").exists() and not list((tmp_path / "cache").glob("*/"))


@pytest.mark.slow
def test_truncated_real_gguf_fails_on_the_command_line_naming_the_file(tmp_path, smollm2_dir):
    # The first 8 MB: the header, the vocabulary and a few tensors; the rest is cut off.
    cut = _copy_prefix(gguf.locate(SMOLLM2_GGUF), tmp_path / "cut.gguf", 8 << 20)
    proc = subprocess.run([sys.executable, "-m", "shardtune", "model", "import", str(cut), "--out",
                           str(tmp_path / "out")], cwd=ROOT, env=run_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"shardtune: model error: {cut}: cannot read this GGUF file"), last
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.importing-*"))


def test_cache_imports_once_while_others_wait(tmp_path, monkeypatch):
    """Four concurrent callers (threads stand in for ranks: flock locks are per open file, so
    they exclude each other as processes do): one import, the same directory for everyone."""
    model_file = tmp_path / "m.gguf"
    model_file.write_bytes(b"GGUF" + bytes(60))
    calls = []

    def slow_import(spec, out, force=False):
        calls.append(out)
        time.sleep(0.5)  # long enough that every other caller reaches the lock meanwhile
        out.mkdir(parents=True)
        (out / gguf.PROVENANCE).write_text(json.dumps({"sha256": gguf.file_digest(Path(spec))}))
        return out

    monkeypatch.setattr(gguf, "import_gguf", slow_import)
    results = []
    threads = [threading.Thread(target=lambda: results.append(gguf.cached_import(model_file, tmp_path / "c")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 4
    assert results[0].name.startswith("m-") and results[0].parent == tmp_path / "c"
    # New content, new key: imported again, into another directory.
    model_file.write_bytes(b"GGUF" + bytes(61))
    assert gguf.cached_import(model_file, tmp_path / "c") != results[0] and len(calls) == 2
