"""The training loop: one optimizer step per iteration, the same code for every strategy.

Per step: this rank takes its share of the global batch, all ranks agree on the number of
loss tokens (so the gradient is the global token-mean whatever the rank/micro-batch
split), each micro-batch runs forward+backward, then one all-reduce carries the loss, a
non-finite flag and any stop request, so every rank takes the same skip/stop/save decision
at the same step.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from shardtune.checkpoint.checkpointer import Checkpointer
from shardtune.config import RunConfig
from shardtune.distributed.process_group import init_distributed, shutdown
from shardtune.eval.loss import evaluate_loss
from shardtune.train.components import build_run, tensorboard_hint, trainer_state, write_export_extras
from shardtune.train.optim import restore_scheduler
from shardtune.train.loss import count_loss_tokens, token_loss_sum
from shardtune.train.metrics import (
    MetricsLogger,
    all_reduce_sum,
    flops_per_token,
    peak_flops_per_rank,
    peak_memory_mib,
)
from shardtune.train.signals import Preempted, StopRequest


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainResult:
    steps: int
    start_step: int = 0
    losses: list[float] = field(default_factory=list)  # global train loss per step run here
    skipped_steps: list[int] = field(default_factory=list)
    val_before: float = math.nan
    val_after: float = math.nan
    tokens_per_s: float = math.nan
    stopped_reason: str = "completed"
    resumed_from: str | None = None
    log_dir: str = ""


def _injected_fault(step: int, rank: int) -> bool:
    """Fault injection for tests: SHARDTUNE_FAULT_NONFINITE='step:rank[,step:rank...]'."""
    spec = os.environ.get("SHARDTUNE_FAULT_NONFINITE")
    return bool(spec) and f"{step}:{rank}" in spec.split(",")


def train(cfg: RunConfig) -> TrainResult:
    ctx = init_distributed(cfg.distributed.init_timeout_s, cfg.distributed.collective_timeout_s)
    try:
        return _train(cfg, ctx)
    finally:
        shutdown()


def _train(cfg: RunConfig, ctx) -> TrainResult:
    parts = build_run(cfg, ctx)
    strategy, loader, device = parts.strategy, parts.loader, ctx.device
    stop_request = StopRequest(cfg.checkpoint.save_on_signal)
    checkpointer = Checkpointer(
        cfg.checkpoint, cfg.checkpoint_dir, ctx, strategy,
        extras_writer=lambda directory: write_export_extras(directory, parts),
    )
    start_step, tokens_seen = 0, 0
    resume_path = checkpointer.select_for_resume()
    if resume_path is not None:
        state = checkpointer.load(resume_path)
        start_step, tokens_seen = state["step"], state["tokens_seen"]
        loader.load_state_dict(state["loader"])
        restore_scheduler(strategy.scheduler, state["scheduler"])

    log = MetricsLogger(
        cfg.output_dir, enabled=ctx.is_main, tensorboard=cfg.metrics.tensorboard,
        progress=cfg.metrics.progress_bar, total_steps=parts.total_steps, initial=start_step,
    )
    result = TrainResult(steps=start_step, start_step=start_step, log_dir=str(log.tensorboard_dir))
    result.resumed_from = str(resume_path) if resume_path else None
    seq_len = cfg.data.seq_len
    flops_token = flops_per_token(parts.model_config, parts.num_params, seq_len)
    peak_flops = all_reduce_sum([peak_flops_per_rank(device, cfg.metrics.peak_tflops_per_rank)], device)[0]
    log.message(
        f"shardtune: {strategy.name} on {ctx.world_size} rank(s) ({ctx.backend}), "
        f"{parts.num_params / 1e6:.2f}M parameters, {parts.total_steps} steps of "
        f"{cfg.train.global_batch_size} x {seq_len} tokens, grad accumulation {loader.grad_accum_steps}"
        + (f", resumed from {resume_path} at step {start_step}" if resume_path else "")
    )

    val_sequences = parts.val_source.epoch(0)
    eval_kwargs = dict(
        micro_batch_size=cfg.train.micro_batch_size, rank=ctx.rank,
        world_size=ctx.world_size, max_batches=cfg.train.eval_batches,
    )
    result.val_before = evaluate_loss(strategy, val_sequences, **eval_kwargs)["loss"]
    log.log(start_step, {"loss": result.val_before}, kind="val")

    strategy.train(True)
    consecutive_bad = 0
    window_start, window_tokens = time.perf_counter(), 0
    run_start = time.perf_counter()
    for step in range(start_step + 1, parts.total_steps + 1):
        checkpointer.poll()
        micro_batches = loader.next_step()
        if micro_batches is None:  # same answer on every rank: the cursor is global
            result.stopped_reason = "end of data"
            break
        local_tokens = sum(count_loss_tokens(mb) for mb in micro_batches)
        global_tokens = all_reduce_sum([float(local_tokens)], device)[0]
        scale = ctx.world_size / max(global_tokens, 1.0)

        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for i, batch in enumerate(micro_batches):
            is_last = i == len(micro_batches) - 1
            with strategy.micro_step(is_last):
                with strategy.autocast():
                    micro_loss = token_loss_sum(strategy.model, batch, device)
                if _injected_fault(step, ctx.rank):
                    micro_loss = micro_loss * float("nan")
                strategy.backward(micro_loss * scale, is_last)
            loss_sum += micro_loss.detach().double()

        local_bad = 0.0 if torch.isfinite(loss_sum) else 1.0
        reduced = all_reduce_sum(
            [0.0 if local_bad else float(loss_sum), local_bad, float(stop_request.requested)], device
        )
        any_bad, stop_requested = reduced[1] > 0, reduced[2] > 0
        outcome = strategy.step(cfg.train.max_grad_norm, skip=any_bad)
        result.steps = step
        tokens_seen += cfg.train.global_batch_size * seq_len

        if any_bad or not outcome.applied:
            consecutive_bad += 1
            result.skipped_steps.append(step)
            what = "loss" if any_bad else "gradient norm"
            stop = cfg.train.on_nonfinite == "stop" or consecutive_bad >= cfg.train.max_consecutive_nonfinite
            # Every rank reports its own decision: the proof that they all agreed is in each log.
            print(
                f"[rank {ctx.rank}] step {step}: non-finite {what} on "
                f"{int(reduced[1]) or 'some'} rank(s); {'stopping' if stop else 'update skipped'}",
                file=sys.stderr, flush=True,
            )
            if stop:
                result.stopped_reason = f"non-finite {what} at step {step}"
                break
        else:
            consecutive_bad = 0
            loss = reduced[0] / max(global_tokens, 1.0)
            result.losses.append(loss)
            window_tokens += cfg.train.global_batch_size * seq_len
            if step % cfg.metrics.log_every == 0 or step == parts.total_steps:
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_tokens / elapsed
                log.log(step, {
                    "loss": loss,
                    "lr": strategy.current_lr(),
                    "grad_norm": outcome.grad_norm,
                    "tokens_per_s": tokens_per_s,
                    "samples_per_s": tokens_per_s / seq_len,
                    "mfu": flops_token * tokens_per_s / peak_flops if peak_flops else 0.0,
                    "peak_memory_mib": peak_memory_mib(device),
                    "checkpoint_blocking_s": checkpointer.last_blocking_s,
                })
                log.advance(0, {"loss": loss, "tok/s": tokens_per_s})
                window_start, window_tokens = time.perf_counter(), 0
        log.advance(1)

        if stop_requested:
            checkpointer.save(step, trainer_state(cfg, step, tokens_seen, loader, strategy), blocking=True)
            result.stopped_reason = f"preempted at step {step} (checkpoint saved)"
            break
        if step == cfg.train.stop_at_step:
            checkpointer.save(step, trainer_state(cfg, step, tokens_seen, loader, strategy))
            result.stopped_reason = f"stop_at_step {step}"
            break
        if checkpointer.due(step, parts.total_steps):
            checkpointer.save(step, trainer_state(cfg, step, tokens_seen, loader, strategy))

    checkpointer.close()
    stop_request.restore()
    train_seconds = time.perf_counter() - run_start
    trained_steps = result.steps - result.start_step - len(result.skipped_steps)
    result.tokens_per_s = trained_steps * cfg.train.global_batch_size * seq_len / max(train_seconds, 1e-9)
    preempted = result.stopped_reason.startswith("preempted")
    if not preempted:  # a preempted job has seconds left: the checkpoint is what matters
        result.val_after = evaluate_loss(strategy, val_sequences, **eval_kwargs)["loss"]
        log.log(result.steps, {"loss": result.val_after}, kind="val")
    log.close()
    if ctx.is_main:
        (cfg.output_dir / "result.json").write_text(json.dumps(asdict(result), indent=1))
        _print_summary(result, cfg)
    if result.stopped_reason.startswith("non-finite"):
        raise NonFiniteLossError(result.stopped_reason)
    if preempted:
        raise Preempted(result.stopped_reason)
    return result


def _print_summary(result: TrainResult, cfg: RunConfig) -> None:
    first = result.losses[0] if result.losses else math.nan
    last = result.losses[-1] if result.losses else math.nan
    print(
        "\n".join([
            f"finished: {result.steps} steps ({result.stopped_reason}), {result.tokens_per_s:,.0f} tokens/s",
            f"  train loss      {first:.4f} (first step) -> {last:.4f} (last step)",
            f"  validation loss {result.val_before:.4f} (before) -> {result.val_after:.4f} (after)",
            f"  checkpoints     {cfg.checkpoint_dir}",
            f"  metrics         {cfg.output_dir / 'metrics.jsonl'}",
            f"  TensorBoard     {result.log_dir}",
            f"  open it with:   {tensorboard_hint(result.log_dir)}",
        ]),
        flush=True,
    )
