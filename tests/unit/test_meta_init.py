"""The meta build replays initialisation exactly: every tensor it produces equals the full
build's under the same seed, and the generator ends where the full build leaves it."""

from __future__ import annotations

import pytest
import torch

from shardtune.models.meta_init import InitValues, build_meta, record_missing_init
from shardtune.models.sharded_load import SafetensorsCheckpoint


def tiny_config(**extra):
    from transformers import AutoConfig

    return AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                pad_token_id=0, **extra)


def all_tensors(model) -> dict[str, torch.Tensor]:
    return dict((*model.named_parameters(), *model.named_buffers()))


def replayed(model, recorder, names) -> dict[str, torch.Tensor]:
    values = {}
    for group in InitValues(model, recorder).groups(set(names)):
        values.update(group)
    return values


@pytest.mark.parametrize("kind", ["tied", "untied", "classification"])
def test_from_config_values_and_generator_match_a_full_build(kind):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if kind == "classification" else AutoModelForCausalLM
    config = tiny_config(tie_word_embeddings=kind == "tied", num_labels=3)
    torch.manual_seed(5)
    full = auto.from_config(config, dtype=torch.float32)
    after_full = torch.rand(4)
    torch.manual_seed(5)
    meta, recorder = build_meta(auto, config, replay_init=True, dtype=torch.float32)
    after_meta = torch.rand(4)
    assert torch.equal(after_full, after_meta)  # later draws (dropout, new heads) match too
    want = all_tensors(full)
    got = replayed(meta, recorder, want)
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    if kind == "tied":
        assert meta.lm_head.weight is meta.model.embed_tokens.weight


def test_checkpoint_head_and_buffers_match_from_pretrained(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(tie_word_embeddings=True)).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path, num_labels=3)
    torch.manual_seed(9)
    reference = AutoModelForSequenceClassification.from_pretrained(tmp_path, config=config, dtype=torch.float32)
    torch.manual_seed(9)
    meta, recorder = build_meta(AutoModelForSequenceClassification, config, replay_init=False, dtype=torch.float32)
    with SafetensorsCheckpoint(tmp_path) as checkpoint:
        loaded = set(all_tensors(meta)) & checkpoint.keys()
        missing = set(all_tensors(meta)) - loaded
        record_missing_init(meta, loaded, recorder)
        assert missing == {"score.weight", "model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"}
        got = replayed(meta, recorder, missing)
        want = all_tensors(reference)
        for name in missing:
            assert torch.equal(got[name], want[name]), name
        # And a loaded tensor read in two ranges equals the file's tensor.
        weight = want["model.layers.1.mlp.down_proj.weight"]
        half = weight.numel() // 2 + 3
        first, second = torch.empty(half), torch.empty(weight.numel() - half)
        checkpoint.read_flat("model.layers.1.mlp.down_proj.weight", 0, first)
        checkpoint.read_flat("model.layers.1.mlp.down_proj.weight", half, second)
        assert torch.equal(torch.cat([first, second]), weight.reshape(-1))
        as_bf16 = torch.empty(weight.shape, dtype=torch.bfloat16)
        checkpoint.read_flat("model.layers.1.mlp.down_proj.weight", 0, as_bf16)
        assert torch.equal(as_bf16, weight.to(torch.bfloat16))
