"""The loss-position-only LM head gives the loss and gradients of the full-logits path.

In-process, one tiny Llama; the 2-rank strategies (DDP, FSDP2, ZeRO) are checked in
tests/distributed/test_loss_positions.py.
"""

from __future__ import annotations

import pytest
import torch

from shardtune import tasks
from shardtune.config import ModelSection
from shardtune.data.packing import IGNORE_INDEX
from shardtune.models.loading import build_model
from shardtune.tasks import CausalLMTask, selective_head

VOCAB = 97


class _Tok:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __len__(self):
        return VOCAB


def tiny_model(tied: bool):
    torch.manual_seed(0)
    cfg = ModelSection(config={
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "tie_word_embeddings": tied,
    })
    return build_model(cfg, _Tok())


def packed_batch(rows: int = 3, seq_len: int = 40, target_share: float = 0.3, seed: int = 1):
    """Rows of packed documents (positions restart), most labels -100 as in assistant-only SFT."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (rows, seq_len), generator=g)
    position_ids = torch.cat([torch.arange(15), torch.arange(seq_len - 15)]).repeat(rows, 1)
    labels = input_ids.clone()
    labels[torch.rand(rows, seq_len, generator=g) > target_share] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def loss_and_grads(model, task, batch):
    model.zero_grad(set_to_none=True)
    loss = task.loss_sum(model, batch, torch.device("cpu"))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(reference, selective):
    (ref_loss, ref_grads), (loss, grads) = reference, selective
    assert loss.dtype == ref_loss.dtype == torch.float32
    assert abs(float(loss - ref_loss)) <= 1e-6 * max(1.0, abs(float(ref_loss))), (loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, want in ref_grads.items():
        scale = max(1.0, float(want.abs().max()))
        diff = float((grads[name] - want).abs().max())
        assert diff <= 1e-6 * scale, f"{name}: max |diff| {diff:.2e}"


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_same_loss_and_gradients_as_full_logits(tied, smoothing, monkeypatch):
    model = tiny_model(tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    batch = packed_batch()
    reference = loss_and_grads(model, CausalLMTask(smoothing, selective=False), batch)
    # Chunks of 5 positions: several chunks and a ragged last one.
    monkeypatch.setattr(tasks, "CHUNK_ELEMENTS", 5 * VOCAB)
    assert_same(reference, loss_and_grads(model, CausalLMTask(smoothing), batch))


def test_a_micro_batch_without_targets_gives_zero_loss_and_gradients():
    model = tiny_model(tied=True)
    batch = packed_batch()
    batch["labels"][:] = IGNORE_INDEX
    reference = loss_and_grads(model, CausalLMTask(selective=False), batch)
    selective = loss_and_grads(model, CausalLMTask(), batch)
    assert float(selective[0]) == 0.0
    assert_same(reference, selective)


def test_frozen_head_and_frozen_base():
    model = tiny_model(tied=False)
    batch = packed_batch()
    for frozen in ("lm_head", "model."):
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith(frozen))
        reference = loss_and_grads(model, CausalLMTask(selective=False), batch)
        assert_same(reference, loss_and_grads(model, CausalLMTask(), batch))


def test_the_head_is_restored_for_logits_and_generation():
    model = tiny_model(tied=False)
    batch = packed_batch()
    CausalLMTask().loss_sum(model, batch, torch.device("cpu"))
    assert "forward" not in model.lm_head.__dict__
    logits = CausalLMTask().logits(model, batch, torch.device("cpu"))
    assert logits.shape == (3, 40, VOCAB)


def test_only_plain_heads_of_known_families_are_swapped():
    model = tiny_model(tied=False)
    assert selective_head(model) is model.lm_head
    model.config.model_type = "gemma2"  # soft-caps the logits after the head
    assert selective_head(model) is None
