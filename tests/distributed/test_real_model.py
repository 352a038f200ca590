"""A real pre-trained chat model (SmolLM2-135M-Instruct, imported from its GGUF once per session):
strategies reproduce one process on it, and the shortened demo fine-tunes it past its baseline,
with merged and adapter exports that answer exactly as the model did inside the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_env, run_shardtune

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

DEMO = ROOT / "configs" / "demo-smollm2.yaml"
# As tests/distributed/test_strategies.py: fp32 sums in another order differ by ~1e-6 relative.
REL_TOLERANCE = 1e-4
QUIET = ("eval.every=null", "eval.batches=1", "eval.generate.samples=0", "eval.metric=loss",
         "eval.test_at_end=false", "eval.save_best=false", "checkpoint.at_end=false", "metrics.log_every=1")


@pytest.fixture(scope="module")
def tickets(smollm2_dir, tmp_path_factory) -> Path:
    """The demo's task data (fewer records), prepared with the model's own tokenizer."""
    from transformers import AutoTokenizer

    from shardtune.config import load_config
    from shardtune.data.prepare import prepare_dataset
    from shardtune.data.synthetic_tasks import ticket_conversations, write_jsonl

    root = tmp_path_factory.mktemp("tickets")
    source = write_jsonl(root / "tickets.jsonl", ticket_conversations(600, 5))
    cfg = load_config(DEMO)
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    prepare_dataset(cfg.data.prepare, root / "prepared", inputs=[str(source)], tokenizer=tokenizer,
                    seq_len=cfg.data.seq_len)
    return root / "prepared"


def run_real(out_dir: Path, model_dir: Path, prepared: Path, *overrides: str, nproc: int):
    return run_shardtune(out_dir, f"model.name_or_path={model_dir}", f"tokenizer.name_or_path={model_dir}",
                         f"data.prepared_dir={prepared}", *overrides, nproc=nproc, config=DEMO, timeout=900)


PARITY = ("finetune.strategy=full", "data.packing=concat", "data.seq_len=48", "train.micro_batch_size=1",
          "train.global_batch_size=2", "train.max_steps=3", "train.lr=1e-4", "train.warmup_steps=0", *QUIET)


@pytest.fixture(scope="module")
def one_process(smollm2_dir, tickets, tmp_path_factory):
    return run_real(tmp_path_factory.mktemp("smollm2-one"), smollm2_dir, tickets, *PARITY, nproc=1)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero3"])
def test_strategies_reproduce_one_process_on_smollm2(strategy, smollm2_dir, tickets, one_process, tmp_path):
    run = run_real(tmp_path, smollm2_dir, tickets, *PARITY, f"distributed.strategy={strategy}", nproc=2)
    losses, reference = run.train_losses(), one_process.train_losses()
    print(f"{strategy}: {losses} vs one process {reference}")
    assert len(losses) == len(reference) == 3
    for step, (got, want) in enumerate(zip(losses, reference, strict=True), start=1):
        assert got == pytest.approx(want, rel=REL_TOLERANCE), f"{strategy} step {step}: {got} vs {want}"
    # Full fine-tuning at 1e-4 moves a 135M model: step 3 is not step 1 (the comparison is not vacuous).
    assert abs(losses[2] - losses[0]) > 1e-2, losses


def test_demo_beats_the_baseline_and_exports_answer_as_in_training(smollm2_dir, tickets, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shardtune.checkpoint.export import export_hf
    from shardtune.checkpoint.manifest import resolve_checkpoint
    from shardtune.commands.generate import greedy_reply, load_for_generation, prompt_ids
    from shardtune.config import load_config
    from shardtune.data.shards import PreparedSource
    from shardtune.data.synthetic_tasks import TICKET_SYSTEM_PROMPT
    from shardtune.data.tokenizer import tokenizer_fingerprint
    from shardtune.eval.generate import generation_samples

    cfg = load_config(DEMO)
    gen = cfg.eval.generate
    run = run_real(tmp_path / "run", smollm2_dir, tickets, "train.max_steps=8", "eval.every=null",
                   "eval.test_at_end=false", "eval.save_best=false", "checkpoint.at_end=true",
                   "eval.generate.samples=16", "eval.generate.examples=8", "eval.generate.micro_batch_size=8",
                   nproc=2)
    result = run.result
    base, final = result["baseline"], result["final"]
    print(f"exact match {base['exact_match']:.3f} -> {final['exact_match']:.3f}, token F1 "
          f"{base['token_f1']:.3f} -> {final['token_f1']:.3f}, wall {result['wall_seconds']:.0f} s")
    assert final["exact_match"] >= base["exact_match"] + 0.25, (base, final)
    assert final["token_f1"] >= final["exact_match"] and final["loss"] < base["loss"] - 1.0

    # The same prompts the run scored; rank 0 decoded every other one and logged its answers.
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    source = PreparedSource(str(tickets), "validation", cfg.data.seq_len, cfg.run.seed,
                            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
    samples = generation_samples(source, 16, cfg.data.seq_len - gen.max_new_tokens)[0::2]
    logged = [r for r in run.metrics("val") if r["step"] == result["steps"]][-1]["generations"]
    assert len(logged) == len(samples) == 8

    checkpoint = resolve_checkpoint(run.out_dir)
    merged = export_hf(checkpoint, tmp_path / "merged", adapters_only=False)
    adapters = export_hf(checkpoint, tmp_path / "adapters", adapters_only=True)
    assert (adapters / "adapter_model.safetensors").is_file() and not (adapters / "model.safetensors").exists()
    merged_model, merged_tokenizer = load_for_generation(merged)
    base_model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    adapter_model = PeftModel.from_pretrained(base_model, str(adapters)).eval()
    for sample, row in zip(samples, logged, strict=True):
        answer = greedy_reply(merged_model, merged_tokenizer, sample.prompt, gen.max_new_tokens)
        assert answer == row["generated"], (answer, row)
        assert greedy_reply(adapter_model, tokenizer, sample.prompt, gen.max_new_tokens) == answer

    # `shardtune generate RUN_DIR`: the LoRA checkpoint answers without a manual merge step.
    ticket = "Hello, my robot vacuum keeps disconnecting from wifi. Please help."
    messages = [{"role": "system", "content": TICKET_SYSTEM_PROMPT}, {"role": "user", "content": ticket}]
    expected = greedy_reply(merged_model, merged_tokenizer, prompt_ids(merged_tokenizer, messages), 8)
    proc = subprocess.run(
        [sys.executable, "-m", "shardtune", "generate", str(run.out_dir), "--system", TICKET_SYSTEM_PROMPT,
         "--prompt", ticket, "--max-new-tokens", "8"],
        cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == expected, (proc.stdout, expected)
    assert json.loads((run.out_dir / "result.json").read_text())["finetune"] == "lora"
