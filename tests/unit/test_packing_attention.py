"""Packed documents must not attend to each other: packed logits equal per-document logits.

Also pins the trap: with ``use_cache=True`` transformers ignores the packed boundaries.
"""

from __future__ import annotations

import torch

from shardtune.config import ModelSection
from shardtune.models.loading import build_model


class _Tok:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __len__(self):
        return 97


def tiny_model():
    torch.manual_seed(0)
    cfg = ModelSection(config={
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
    })
    return build_model(cfg, _Tok()).eval()


def packed_and_separate_logits(model, use_cache: bool):
    torch.manual_seed(1)
    doc_a, doc_b = torch.randint(3, 97, (1, 11)), torch.randint(3, 97, (1, 9))
    packed = torch.cat([doc_a, doc_b], dim=1)
    positions = torch.cat([torch.arange(11), torch.arange(9)]).unsqueeze(0)
    with torch.no_grad():
        packed_logits = model(input_ids=packed, position_ids=positions, use_cache=use_cache).logits
        separate = torch.cat([model(input_ids=doc_a).logits, model(input_ids=doc_b).logits], dim=1)
    return packed_logits, separate


def test_build_model_disables_the_cache():
    assert tiny_model().config.use_cache is False


def test_packed_logits_match_unpacked():
    packed, separate = packed_and_separate_logits(tiny_model(), use_cache=False)
    assert torch.allclose(packed, separate, atol=1e-5), (packed - separate).abs().max()


def test_use_cache_true_leaks_across_documents():
    # If this starts passing as equal, transformers fixed the trap and the guard can go.
    model = tiny_model()
    model.config.use_cache = True
    packed, separate = packed_and_separate_logits(model, use_cache=True)
    assert not torch.allclose(packed[:, 11:], separate[:, 11:], atol=1e-3)
