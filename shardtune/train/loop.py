"""The training loop: one optimizer step per iteration, the same code for every strategy.

Per step: this rank takes its share of the global batch, all ranks agree on the number of
loss tokens (so the gradient is the global token-mean whatever the rank/micro-batch
split), each micro-batch runs forward+backward, then one all-reduce carries the loss,
non-finite flags (loss, and gradients where a rank clips with its own replica's norm) and
any stop request, so every rank takes the same skip/stop/save decision at the same step.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from shardtune import faults
from shardtune.checkpoint.checkpointer import Checkpointer
from shardtune.checkpoint.manifest import step_dir_name
from shardtune.config import RunConfig
from shardtune.distributed.collectives import all_reduce_sum
from shardtune.distributed.process_group import init_distributed, shutdown
from shardtune.distributed.watchdog import explain_collective_failure, mark_progress
from shardtune.errors import NonFiniteLossError, Preempted
from shardtune.eval.tracker import EvalTracker
from shardtune.optim import restore_scheduler
from shardtune.train.components import build_run, tensorboard_hint, trainer_state, write_export_extras
from shardtune.train.metrics import MetricsLogger, flops_per_token, peak_flops_per_rank, peak_memory_mib
from shardtune.train.signals import StopRequest


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
    task: str = "causal_lm"
    finetune: str = "full"
    total_params: int = 0
    trainable_params: int = 0
    wall_seconds: float = math.nan
    eval_metric: str = "loss"
    baseline: dict | None = None  # validation metrics before step 1 (scalars)
    final: dict | None = None  # validation metrics at the last step
    best: dict | None = None
    best_step: int | None = None
    best_checkpoint: str | None = None
    test: dict | None = None  # test split, evaluated once with the best checkpoint


def train(cfg: RunConfig) -> TrainResult:
    ctx = init_distributed(cfg.distributed.init_timeout_s, cfg.distributed.collective_timeout_s)
    clean = False
    try:
        result = _train(cfg, ctx)
        clean = True
        return result
    except (NonFiniteLossError, Preempted):
        clean = True  # every rank agreed on this ending: the group is healthy
        raise
    except RuntimeError as exc:
        # A timed-out or broken collective: name the rank(s) that fell behind.
        clearer = explain_collective_failure(exc, ctx.rank, ctx.world_size, cfg.distributed.collective_timeout_s)
        if clearer is None:
            raise
        raise clearer from exc
    finally:
        shutdown(clean)


def _train(cfg: RunConfig, ctx) -> TrainResult:
    parts = build_run(cfg, ctx)
    strategy, loader, device = parts.strategy, parts.loader, ctx.device
    stop_request = StopRequest(cfg.checkpoint.save_on_signal)
    checkpointer = Checkpointer(
        cfg.checkpoint, cfg.checkpoint_dir, ctx, strategy,
        extras_writer=lambda directory: write_export_extras(directory, parts),
    )
    start_step, tokens_seen, eval_state = 0, 0, None
    resume_path = checkpointer.select_for_resume()
    if resume_path is not None:
        state = checkpointer.load(resume_path)
        start_step, tokens_seen = state["step"], state["tokens_seen"]
        eval_state = state.get("eval")  # absent in checkpoints written before it was saved
        loader.load_state_dict(state["loader"])
        restore_scheduler(strategy.scheduler, state["scheduler"])

    log = MetricsLogger(
        cfg.output_dir, enabled=ctx.is_main, tensorboard=cfg.metrics.tensorboard,
        progress=cfg.metrics.progress_bar, total_steps=parts.total_steps, initial=start_step,
    )
    result = TrainResult(
        steps=start_step, start_step=start_step, log_dir=str(log.tensorboard_dir), task=cfg.task,
        finetune=cfg.finetune.strategy, total_params=parts.plan.total_params,
        trainable_params=parts.plan.trainable_params, eval_metric=cfg.eval_metric,
    )
    result.resumed_from = str(resume_path) if resume_path else None
    seq_len = cfg.data.seq_len
    flops_token = flops_per_token(parts.model_config, parts.num_params, seq_len)
    peak_flops = all_reduce_sum([peak_flops_per_rank(device, cfg.metrics.peak_tflops_per_rank)], device)[0]
    log.message(
        f"shardtune: {strategy.name} on {ctx.world_size} rank(s) ({ctx.backend}), "
        f"{parts.num_params / 1e6:.2f}M parameters, {parts.total_steps} steps of "
        f"{cfg.train.global_batch_size} x {seq_len} tokens, grad accumulation {loader.grad_accum_steps}"
        + (f", resumed from {resume_path} at step {start_step}" if resume_path else "")
        + f"\n{parts.plan.describe()}"
    )

    task = parts.task
    tracker = EvalTracker(cfg, ctx, strategy, parts, log)
    if eval_state:
        tracker.load_state_dict(eval_state)
        if tracker.best_step is not None and cfg.eval.save_best:
            checkpointer.pinned = {tracker.best_step}  # retention must still keep the best
    result.val_before = tracker.evaluate_baseline(start_step)["loss"]
    result.baseline = _scalars(tracker.baseline)

    strategy.train(True)
    consecutive_bad = 0
    window_start, window_tokens = time.perf_counter(), 0
    run_start = time.perf_counter()
    for step in range(start_step + 1, parts.total_steps + 1):
        faults.step_begins(step, ctx.rank)
        checkpointer.poll()
        micro_batches = loader.next_step()
        if micro_batches is None:  # same answer on every rank: the cursor is global
            result.stopped_reason = "end of data"
            break
        local_tokens = sum(task.count_targets(mb) for mb in micro_batches)
        global_tokens = all_reduce_sum([float(local_tokens)], device)[0]
        scale = ctx.world_size / max(global_tokens, 1.0)

        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for i, batch in enumerate(micro_batches):
            is_last = i == len(micro_batches) - 1
            with strategy.micro_step(is_last):
                with strategy.autocast():
                    micro_loss = task.loss_sum(strategy.model, batch, device)
                if faults.nonfinite_loss(step, ctx.rank):
                    micro_loss = micro_loss * float("nan")
                strategy.backward(faults.poison_backward(micro_loss, step, ctx.rank) * scale, is_last)
            loss_sum += micro_loss.detach().double()
        faults.corrupt_gradient_replica(step, ctx.rank, strategy.model.parameters())

        local_bad = 0.0 if torch.isfinite(loss_sum) else 1.0
        grads_bad = 0.0 if strategy.local_grads_finite() else 1.0
        faults.maybe_stall(step, ctx.rank)
        mark_progress(ctx.rank, step)  # read only if a collective times out
        reduced = all_reduce_sum(
            [0.0 if local_bad else float(loss_sum), local_bad, float(stop_request.requested), grads_bad], device
        )
        any_bad, stop_requested = reduced[1] > 0 or reduced[3] > 0, reduced[2] > 0
        outcome = strategy.step(cfg.train.max_grad_norm, skip=any_bad)
        result.steps = step
        tokens_seen += cfg.train.global_batch_size * seq_len

        if any_bad or not outcome.applied:
            consecutive_bad += 1
            result.skipped_steps.append(step)
            if reduced[1]:
                what, count = "loss", int(reduced[1])
            elif reduced[3]:  # a rank's own gradient copy (DDP replica)
                what, count = "gradients", int(reduced[3])
            else:  # the norm reduced across ranks (FSDP2, ZeRO): every rank saw the same value
                what, count = "gradient norm", 0
            stop = cfg.train.on_nonfinite == "stop" or consecutive_bad >= cfg.train.max_consecutive_nonfinite
            # Every rank reports its own decision: the proof that they all agreed is in each log.
            print(
                f"[rank {ctx.rank}] step {step}: non-finite {what} on "
                f"{count or 'some'} rank(s); {'stopping' if stop else 'update skipped'}",
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

        if tracker.due(step, parts.total_steps) and not stop_requested:
            eval_start = time.perf_counter()
            metrics = tracker.evaluate(step)
            if metrics["improved"] and cfg.eval.save_best:
                checkpointer.pinned = {step}  # retention keeps the best checkpoint
                tracker.best_checkpoint = str(checkpointer.root / step_dir_name(step))
                checkpointer.save(step, trainer_state(cfg, step, tokens_seen, loader, strategy, tracker))
            window_start += time.perf_counter() - eval_start  # keep evaluation out of throughput
            if metrics["stop"]:
                result.stopped_reason = (
                    f"early stopping at step {step}: val {tracker.metric} did not improve for "
                    f"{cfg.eval.patience} evaluations (best {tracker.best[tracker.metric]:.4f} at step {tracker.best_step})"
                )
                break

        if stop_requested:
            checkpointer.save(step, trainer_state(cfg, step, tokens_seen, loader, strategy, tracker), blocking=True)
            result.stopped_reason = f"preempted at step {step} (checkpoint saved)"
            break
        if step == cfg.train.stop_at_step:
            checkpointer.save(step, trainer_state(cfg, step, tokens_seen, loader, strategy, tracker))
            result.stopped_reason = f"stop_at_step {step}"
            break
        if checkpointer.due(step, parts.total_steps) and checkpointer.last_saved_step != step:
            checkpointer.save(step, trainer_state(cfg, step, tokens_seen, loader, strategy, tracker))

    train_seconds = time.perf_counter() - run_start - tracker.seconds
    trained_steps = result.steps - result.start_step - len(result.skipped_steps)
    result.tokens_per_s = trained_steps * cfg.train.global_batch_size * seq_len / max(train_seconds, 1e-9)
    preempted = result.stopped_reason.startswith("preempted")
    if not preempted:  # a preempted job has seconds left: the checkpoint is what matters
        if tracker.last_step != result.steps:
            tracker.evaluate(result.steps)
        result.val_after = tracker.latest["loss"]
        _finish_evaluation(cfg, result, tracker, checkpointer, strategy)
    checkpointer.close()
    # The handlers stay installed: a signal arriving after the last step only sets a flag
    # nobody reads, where the default action would kill a run that already finished.
    result.wall_seconds = time.perf_counter() - run_start
    log.close()
    if ctx.is_main:
        (cfg.output_dir / "result.json").write_text(json.dumps(asdict(result), indent=1))
        _write_report(cfg.output_dir)
        _print_summary(result, cfg)
    if result.stopped_reason.startswith("non-finite"):
        raise NonFiniteLossError(result.stopped_reason)
    if preempted:
        stop_request.ignore_further()
        raise Preempted(result.stopped_reason)
    return result


def _scalars(metrics: dict | None) -> dict | None:
    if metrics is None:
        return None
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _finish_evaluation(cfg, result: TrainResult, tracker: EvalTracker, checkpointer, strategy) -> None:
    """Record final/best metrics; evaluate the test split once, with the best checkpoint's weights."""
    result.final = _scalars(tracker.latest)
    result.best, result.best_step = _scalars(tracker.best), tracker.best_step
    # Not last_saved_step: a resumed run may have saved nothing since, its best predating it.
    if tracker.best_step is not None and cfg.eval.save_best:
        best_path = checkpointer.root / step_dir_name(tracker.best_step)
        checkpointer.wait()
        if tracker.best_step != result.steps and best_path.is_dir():
            checkpointer.load(best_path)  # weights (and optimizer) of the best evaluation
        result.best_checkpoint = str(best_path) if best_path.is_dir() else None
    test = tracker.evaluate_test(result.steps)
    result.test = _scalars(test)
    tracker.write_summary(result.steps, test)
    if test is not None and "confusion" in test:
        result.test["confusion"] = test["confusion"]


def _write_report(run_dir) -> None:
    from shardtune.eval.report import write_report

    try:
        write_report(run_dir)
    except Exception as exc:  # a report problem must not fail a finished training run
        print(f"shardtune: could not write {run_dir / 'report.md'}: {exc!r}", file=sys.stderr)


def _print_summary(result: TrainResult, cfg: RunConfig) -> None:
    first = result.losses[0] if result.losses else math.nan
    last = result.losses[-1] if result.losses else math.nan
    print(
        "\n".join([
            f"finished: {result.steps} steps ({result.stopped_reason}), {result.tokens_per_s:,.0f} tokens/s",
            f"  train loss      {first:.4f} (first step) -> {last:.4f} (last step)",
            f"  validation loss {result.val_before:.4f} (before) -> {result.val_after:.4f} (after)",
            *_metric_lines(result),
            f"  checkpoints     {cfg.checkpoint_dir}",
            f"  metrics         {cfg.output_dir / 'metrics.jsonl'}",
            f"  report          {cfg.output_dir / 'report.md'}",
            f"  TensorBoard     {result.log_dir}",
            f"  open it with:   {tensorboard_hint(result.log_dir)}",
        ]),
        flush=True,
    )


def _metric_lines(result: TrainResult) -> list[str]:
    key = result.eval_metric
    lines = []
    if key != "loss" and result.baseline and result.final and key in result.final:
        lines.append(f"  validation {key:<5} {result.baseline[key]:.4f} (baseline) -> {result.final[key]:.4f} (after)")
    if result.best_step is not None and result.best:
        lines.append(f"  best            val {key} {result.best[key]:.4f} at step {result.best_step}")
    if result.test:
        lines.append(f"  test            {key} {result.test.get(key, float('nan')):.4f} (best checkpoint)")
    return lines
