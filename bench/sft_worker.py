"""The Hugging Face side of bench/sft.py, and the one scorer every trained model goes through.

    python -m torch.distributed.run --standalone --nproc-per-node 2 bench/sft_worker.py hf SPEC OUT
    python -m torch.distributed.run --standalone --nproc-per-node 2 bench/sft_worker.py trl SPEC OUT
    python bench/sft_worker.py score SPEC OUT

``hf``: ``transformers.Trainer`` with ``DataCollatorForSeq2Seq`` (each batch padded to its
longest example). ``trl``: TRL ``SFTTrainer`` with ``packing=True`` and its default packing
strategy (best-fit decreasing, padding-free). Both train on the records shardtune prepared
(the same token ids and assistant-only labels; bench/sft.py writes them into SPEC), load the
model directory shardtune loads, and save the trained model for scoring.

What each step really processed is counted where the loss is computed (the batch the model
sees, after any collator or packing), per rank: positions (padding included), real tokens,
loss tokens (labels[1:] != -100, the convention shardtune counts) and records. Step end times
come from a callback, as in bench/hf_trainer_worker.py. Each rank writes ``OUT.rank<r>.json``.

``score``: validation loss of each model directory in SPEC on the same records, one record
per forward (no padding, no packing): the mean cross-entropy over the assistant tokens.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

IGNORE = -100


class StepCounter:
    """Per-step sums of what the model was given on this rank (filled from compute_loss)."""

    def __init__(self):
        self.current = {"positions": 0, "real_tokens": 0, "loss_tokens": 0, "records": 0}
        self.steps: list[dict] = []

    def add(self, inputs: dict) -> None:
        ids, labels = inputs["input_ids"], inputs["labels"]
        mask = inputs.get("attention_mask")
        self.current["positions"] += ids.numel()
        self.current["real_tokens"] += int(mask.sum()) if mask is not None else ids.numel()
        self.current["loss_tokens"] += int((labels[..., 1:] != IGNORE).sum())
        if "position_ids" in inputs and mask is None:  # padding-free: documents restart at position 0
            self.current["records"] += int((inputs["position_ids"] == 0).sum())
        else:
            self.current["records"] += ids.shape[0]

    def close_step(self) -> None:
        self.steps.append(self.current)
        self.current = {k: 0 for k in self.current}


def _training_args(cls, spec: dict, **extra):
    hp = spec["hparams"]
    # Same optimizer, schedule and clipping as the shardtune runs (bench/sft.py's HPARAMS).
    return cls(
        output_dir=spec["work_dir"], use_cpu=True, report_to=[], max_steps=spec["steps"],
        per_device_train_batch_size=spec["per_device_batch"], gradient_accumulation_steps=1,
        learning_rate=hp["lr"], weight_decay=hp["weight_decay"], adam_beta1=hp["betas"][0],
        adam_beta2=hp["betas"][1], adam_epsilon=hp["eps"], max_grad_norm=hp["max_grad_norm"],
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, seed=spec["seed"], dataloader_num_workers=0,
        # Every parameter is used: HF's default (True) adds an autograd-graph walk per step.
        ddp_find_unused_parameters=False, bf16=False, fp16=False, **extra)


def train(kind: str, spec_path: str, out_path: str) -> int:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    records = [json.loads(line) for line in Path(spec["records"]).read_text().splitlines()]
    dataset = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in records])
    counter = StepCounter()
    times: list[tuple[int, float]] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            times.append((0, time.perf_counter()))

        def on_step_end(self, args, state, control, **kwargs):
            counter.close_step()
            times.append((state.global_step, time.perf_counter()))

    if kind == "hf":
        from transformers import DataCollatorForSeq2Seq, Trainer

        class CountingTrainer(Trainer):
            def compute_loss(self, model, inputs, *args, **kwargs):
                counter.add(inputs)
                return super().compute_loss(model, inputs, *args, **kwargs)

        args = _training_args(__import__("transformers").TrainingArguments, spec, remove_unused_columns=False)
        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE)
        trainer = CountingTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                                  processing_class=tokenizer, callbacks=[StepTimer()])
    else:
        from trl import SFTConfig, SFTTrainer

        class CountingSFTTrainer(SFTTrainer):
            def compute_loss(self, model, inputs, *args, **kwargs):
                counter.add(inputs)
                return super().compute_loss(model, inputs, *args, **kwargs)

        # packing=True with TRL's default strategy (bfd: padding-free). bf16 and gradient
        # checkpointing are TRL defaults meant for GPUs: off, as for every other contender.
        args = _training_args(SFTConfig, spec, packing=True, max_length=spec["seq_len"],
                              gradient_checkpointing=False)
        trainer = CountingSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                     callbacks=[StepTimer()])
    result = trainer.train()
    Path(f"{out_path}.rank{rank}.json").write_text(json.dumps({
        "rank": rank, "step_times": times, "steps": counter.steps, "threads": torch.get_num_threads(),
        "train_loss": result.training_loss, "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "packing_strategy": getattr(trainer.args, "packing_strategy", None),
        "padding_free": getattr(trainer.args, "padding_free", None) or getattr(trainer, "padding_free", None),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }))
    if rank == 0:
        trainer.save_model(spec["save_dir"])
        print(f"sft_worker {kind}: {len(times) - 1} steps, train loss {result.training_loss:.4f}", flush=True)
    return 0


@torch.no_grad()
def score(spec_path: str, out_path: str) -> int:
    """Mean assistant-token cross-entropy of each model on the same validation records."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    spec = json.loads(Path(spec_path).read_text())
    sets = {name: [json.loads(line) for line in Path(path).read_text().splitlines()]
            for name, path in spec["sets"].items()}
    out = {}
    for label, model_dir in spec["models"].items():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        per_set, total = {}, [0.0, 0]
        for name, records in sets.items():
            loss_sum, count = 0.0, 0
            for r in records:
                ids = torch.tensor([r["input_ids"]])
                labels = torch.tensor(r["labels"][1:])
                logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
                loss_sum += float(F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum"))
                count += int((labels != IGNORE).sum())
            per_set[name] = loss_sum / count
            total[0] += loss_sum
            total[1] += count
        out[label] = {"val_loss": total[0] / total[1], "per_set": per_set, "loss_tokens": total[1]}
        print(f"score: {label}: {out[label]['val_loss']:.4f}", flush=True)
        del model
    Path(out_path).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    mode, spec_arg, out_arg = sys.argv[1:4]
    sys.exit(score(spec_arg, out_arg) if mode == "score" else train(mode, spec_arg, out_arg))
