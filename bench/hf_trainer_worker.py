"""Hugging Face ``Trainer`` reference run for bench/throughput.py (one process, or one rank of torchrun).

Same model (built by shardtune's own ``build_model`` from the same config and seed), same
tokenizer files, same packed sequences in the same order (shardtune's ``build_sources`` and
epoch 0 of its packing, read sequentially), same micro/global batch, seq len, optimizer
hyper-parameters and clipping. Step end times are recorded by a callback; rank 0 writes them
as JSON and the orchestrator turns them into steady-state tokens/s after the warm-up steps.

    python bench/hf_trainer_worker.py --out t.json --tokenizer-dir DIR --steps 24 [overrides ...]
    python -m torch.distributed.run --standalone --nproc-per-node 2 bench/hf_trainer_worker.py ...
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


class PackedDataset(torch.utils.data.Dataset):
    """shardtune's packed sequences (input_ids, labels with -100, per-document position_ids)."""

    def __init__(self, sequences, limit: int):
        self.sequences = sequences
        self.length = min(len(sequences), limit)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        return {key: torch.from_numpy(value) for key, value in self.sequences[k].items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="JSON file for the step timings (rank 0)")
    parser.add_argument("--tokenizer-dir", required=True, help="tokenizer saved by a shardtune run (trained here if missing)")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("overrides", nargs="*", help="shardtune dotted config overrides")
    args = parser.parse_args()

    from transformers import Trainer, TrainerCallback, TrainingArguments

    from shardtune.config import load_config
    from shardtune.data.corpus import build_sources, load_records, record_text
    from shardtune.data.tokenizer import load_tokenizer, train_tokenizer
    from shardtune.models.loading import build_model

    cfg = load_config(None, args.overrides)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    tok_dir = Path(args.tokenizer_dir)
    if not (tok_dir / "tokenizer.json").is_file():
        if world_size > 1:
            raise SystemExit(f"{tok_dir} has no tokenizer; run the 1-process worker (or shardtune) first")
        train_tokenizer((record_text(r) for r in load_records(cfg.data, cfg.run.seed)),
                        cfg.tokenizer.vocab_size, tok_dir)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.model.trust_remote_code, saved_dir=tok_dir)
    train_source, _ = build_sources(cfg.data, tokenizer, cfg.run.seed)
    train_cfg = cfg.train
    dataset = PackedDataset(train_source.epoch(0), args.steps * train_cfg.global_batch_size)
    if len(dataset) < args.steps * train_cfg.global_batch_size:
        raise SystemExit(f"only {len(dataset)} packed sequences for {args.steps} steps; raise data.synthetic.num_records")

    torch.manual_seed(cfg.run.seed)  # the same initial weights as shardtune's build_run
    model = build_model(cfg.model, tokenizer)

    accum, rem = divmod(train_cfg.global_batch_size, train_cfg.micro_batch_size * world_size)
    assert rem == 0 and accum >= 1, "global batch must split into ranks x micro-batches"
    work_dir = Path(args.work_dir or Path(args.out).with_suffix(".hf"))
    targs = TrainingArguments(
        output_dir=str(work_dir),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=train_cfg.micro_batch_size,
        gradient_accumulation_steps=accum,
        max_steps=args.steps,
        learning_rate=train_cfg.lr,
        weight_decay=train_cfg.weight_decay,
        adam_beta1=train_cfg.betas[0],
        adam_beta2=train_cfg.betas[1],
        adam_epsilon=train_cfg.eps,
        max_grad_norm=train_cfg.max_grad_norm or 0.0,
        lr_scheduler_type="cosine",
        warmup_steps=train_cfg.warmup_steps,
        optim="adamw_torch",
        train_sampling_strategy="sequential",  # shardtune's order: sequence k of epoch 0
        dataloader_num_workers=0,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=cfg.run.seed,
        remove_unused_columns=False,
        # HF's default for a PreTrainedModel is True (an extra autograd-graph walk every step);
        # every parameter is used here, so the reference gets the faster, correct setting.
        ddp_find_unused_parameters=False,
    )

    times: list[tuple[int, float]] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            times.append((0, time.perf_counter()))

        def on_step_end(self, args, state, control, **kwargs):
            times.append((state.global_step, time.perf_counter()))

    trainer = Trainer(model=model, args=targs, train_dataset=dataset, callbacks=[StepTimer()])
    result = trainer.train()
    if rank == 0:
        Path(args.out).write_text(json.dumps({
            "step_times": times,
            "world_size": world_size,
            "threads": torch.get_num_threads(),
            "grad_accum": accum,
            "tokens_per_step": train_cfg.global_batch_size * cfg.data.seq_len,
            "train_loss": result.training_loss,
        }))
        print(f"hf_trainer_worker: {len(times) - 1} steps, {world_size} process(es) x "
              f"{torch.get_num_threads()} thread(s), train loss {result.training_loss:.4f}", flush=True)


if __name__ == "__main__":
    main()
