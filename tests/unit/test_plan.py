"""`shardtune plan`: parameter counts, per-strategy state bytes checked against live tensors
measured in real 2-rank runs, and the recommendation."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_env

from shardtune.plan import KNOWN_ARCHITECTURES, Architecture, estimate, plan_table, state_bytes

DEMO = ROOT / "configs" / "demo-cpu.yaml"


def test_parameter_count_matches_a_real_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    values = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**values))
    assert Architecture.from_mapping(values).params == sum(p.numel() for p in model.parameters())


def test_known_architectures_have_their_published_sizes():
    assert Architecture.from_mapping(KNOWN_ARCHITECTURES["llama-3.1-8b"]).params / 1e9 == pytest.approx(8.03, abs=0.01)
    assert Architecture.from_mapping(KNOWN_ARCHITECTURES["llama-3.1-70b"]).params / 1e9 == pytest.approx(70.55, abs=0.01)


def test_sharding_divides_what_it_should():
    p = 10**9
    ddp = sum(state_bytes("ddp", p, 8, bf16=True))
    assert ddp == 16 * p
    assert sum(state_bytes("zero3", p, 8, bf16=True)) < sum(state_bytes("zero2", p, 8, bf16=True)) < sum(
        state_bytes("zero1", p, 8, bf16=True)) < ddp
    offloaded = state_bytes("zero3", p, 8, bf16=True, offload=True)
    assert offloaded[2] == 0  # moments and master weights live on the host


def test_70b_on_four_nodes_needs_full_sharding():
    arch = Architecture.from_mapping(KNOWN_ARCHITECTURES["llama-3.1-70b"])
    rows, best = plan_table(arch, ranks=32, seq_len=4096, gpu_memory_gib=80, bf16=True, checkpointing=True)
    fits = {r["strategy"]: r["max_micro_batch"] for r in rows}
    assert fits["ddp"] == fits["zero1"] == fits["zero2"] == 0
    assert best["strategy"] in ("fsdp", "zero3")
    e = estimate(arch, "zero3", 32, 1, 4096, True, checkpointing=False)
    assert e.activations_gib > estimate(arch, "zero3", 32, 1, 4096, True, checkpointing=True).activations_gib * 5


def test_plan_command_prints_table_and_recommendation():
    out = subprocess.run(
        [sys.executable, "-m", "shardtune", "plan", str(ROOT / "configs" / "llama3-8b-fsdp2-1node.yaml"),
         "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory", "80GiB"],
        capture_output=True, text=True, env=run_env(), cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "8.03B parameters" in out.stdout and "| zero3 |" in out.stdout
    assert "Recommended:" in out.stdout
    assert "Host memory while loading: ddp 29.9 GiB/rank" in out.stdout
    assert "fsdp 0.2 GiB/rank" in out.stdout


def test_host_memory_while_loading():
    from shardtune.plan import host_load_bytes

    arch = Architecture.from_mapping(KNOWN_ARCHITECTURES["llama-3.1-8b"])
    assert host_load_bytes("ddp", arch, 8) == host_load_bytes("zero2", arch, 8) == 4 * arch.params
    # Sharded on GPU: one tensor's shard at a time passes through the host (the embedding / 8).
    assert host_load_bytes("fsdp", arch, 8) == 4 * arch.vocab * arch.hidden / 8
    # On CPU the shards stay on the host; a model from a config replays its embedding in full.
    assert host_load_bytes("zero3", arch, 4, on_gpu=False) == 4 * arch.params / 4
    assert host_load_bytes("fsdp", arch, 8, pretrained=False) > 4 * arch.vocab * arch.hidden




def test_flops_per_token_counts_a_tied_output_projection():
    from transformers import LlamaConfig

    from shardtune.train.metrics import flops_per_token

    config = LlamaConfig(hidden_size=64, vocab_size=1000, num_hidden_layers=2)
    attention = 12 * 2 * 64 * 128
    config.tie_word_embeddings = True  # the shared matrix is both lookup and output matmul
    assert flops_per_token(config, 100_000, 128) == 6 * 100_000 + attention
    config.tie_word_embeddings = False  # the input lookup is no matmul
    assert flops_per_token(config, 100_000, 128) == 6 * (100_000 - 64_000) + attention


def test_flops_per_token_charges_frozen_weights_no_weight_gradient():
    from transformers import LlamaConfig

    from shardtune.train.metrics import flops_per_token

    config = LlamaConfig(hidden_size=64, vocab_size=1000, num_hidden_layers=2, tie_word_embeddings=True)
    attention = 12 * 2 * 64 * 128
    # LoRA: 2,000 adapter weights train; the 100,000 frozen ones still pass input gradients back.
    assert flops_per_token(config, 102_000, 128, trainable_params=2_000) == 6 * 2_000 + 4 * 100_000 + attention
    # A frozen base under a trained head: below the head nothing needs a backward pass at all.
    frozen_base = flops_per_token(config, 100_000, 128, trainable_params=64_000, forward_only_layers=2)
    assert frozen_base == 6 * 64_000 + 2 * 36_000 + 4 * 2 * 64 * 128
    # Untied and frozen, the lookup table is still no matmul.
    config.tie_word_embeddings = False
    assert flops_per_token(config, 102_000, 128, trainable_params=2_000) == 6 * 2_000 + 4 * 36_000 + attention
    assert flops_per_token(config, 100_000, 128, trainable_params=100_000) == flops_per_token(config, 100_000, 128)


# "full" is left out: with every block reduced to its input, the estimate is dominated by
# the logits term, which counts the logits' gradient too (a backward-time peak, not a tensor
# forward saves), so the forward-saved bytes are ~25% below it by construction.
@pytest.mark.parametrize("policy", ["none", "selective"])
def test_activation_estimate_within_10_percent_of_saved_tensors(policy):
    from test_scaling import TINY_LLAMA, saved_activation_bytes

    from shardtune.plan import activation_bytes, block_activation_values, checkpointed_blocks

    *_, measured = saved_activation_bytes(policy, every=2)
    arch = Architecture.from_mapping({**TINY_LLAMA, "vocab_size": 512})
    estimated = activation_bytes(arch, micro_batch=2, seq_len=128, bf16=False, checkpointing=policy, every=2)
    if checkpointed_blocks(arch.layers, policy, 2):
        # What forward saves; the one block recomputed at a time in backward comes on top.
        estimated -= 2 * 128 * block_activation_values(arch) * 4
    assert measured == pytest.approx(estimated, rel=0.10), (measured, estimated)
