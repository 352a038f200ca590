"""The training loop: build the run, resume it, then one ``train_step`` per iteration until the
budget, the data, a stop request or early stopping ends it; the same code for every strategy.

What a step does and how ranks agree on its outcome is in ``train/step.py``; what a checkpoint holds
is in ``checkpoint/``; the loop only decides when to log, evaluate, save and stop.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field

from shardtune import faults
from shardtune.checkpoint.manifest import step_dir_name
from shardtune.checkpoint.trainer_state import TrainProgress
from shardtune.config import RunConfig
from shardtune.distributed.collectives import all_reduce_sum
from shardtune.distributed.process_group import init_distributed, shutdown
from shardtune.distributed.watchdog import explain_collective_failure, report_crash
from shardtune.errors import NonFiniteLossError, Preempted
from shardtune.eval.tracker import EvalTracker
from shardtune.preference import ensure_reference
from shardtune.train.components import build_checkpointer, build_run, tensorboard_hint
from shardtune.train.metrics import (
    MetricsLogger,
    flops_per_token,
    head_flops_per_position,
    peak_flops_per_rank,
    peak_memory_mib,
)
from shardtune.train.signals import StopRequest, stop_received
from shardtune.train.step import train_step


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
    peak_host_memory_mib: float = math.nan  # host RSS peak after the model loaded, largest rank


def train(cfg: RunConfig) -> TrainResult:
    ctx = init_distributed(cfg.distributed.init_timeout_s, cfg.distributed.collective_timeout_s,
                           cfg.distributed.rendezvous_interface)
    clean = False
    try:
        with ExitStack() as cleanup:
            result = _train(cfg, ctx, cleanup)
        clean = True
    except RuntimeError as exc:
        # A timed-out or broken collective: name the rank(s) that fell behind.
        # A stop signal now is the launcher tearing the group down: name what is known, at once.
        clearer = explain_collective_failure(exc, ctx.rank, ctx.world_size, cfg.distributed.collective_timeout_s,
                                             interrupted=stop_received)
        if clearer is None:
            report_crash(ctx.rank, exc)
            raise
        raise clearer from exc
    except Exception as exc:
        report_crash(ctx.rank, exc)  # the others' next collective fails: they name this rank
        raise
    finally:
        shutdown(clean)
    # Every rank agreed on these endings, so the group above shut down cleanly.
    if result.stopped_reason.startswith("non-finite"):
        raise NonFiniteLossError(result.stopped_reason)
    if result.stopped_reason.startswith("preempted"):
        raise Preempted(result.stopped_reason)
    return result


def _train(cfg: RunConfig, ctx, cleanup: ExitStack) -> TrainResult:
    parts = build_run(cfg, ctx)
    strategy, loader, task, hooks = parts.strategy, parts.loader, parts.task, faults.hooks()
    # Only process-local clean-up goes on the stack: a crashed rank must not enter a collective
    # (the checkpointer's final commit) that its peers will never join.
    cleanup.callback(loader.close)
    stop_request = StopRequest(cfg.checkpoint.save_on_signal)
    log = MetricsLogger(cfg.output_dir, enabled=ctx.is_main, trackers=cfg.metrics.trackers,
                        progress=cfg.metrics.progress_bar, total_steps=parts.total_steps,
                        run_name=cfg.run.name, config=cfg.model_dump(mode="json"))
    cleanup.callback(log.close)
    tracker = EvalTracker(cfg, ctx, strategy, parts, log)
    progress = TrainProgress()
    checkpointer = build_checkpointer(cfg, ctx, parts, progress, tracker)
    resume_path = checkpointer.resume()
    reference_note = ensure_reference(parts, ctx, resumed=resume_path is not None)  # preference runs
    if tracker.best_step is not None and cfg.eval.save_best:
        checkpointer.pinned = {tracker.best_step}  # retention must still keep the best
    start_step = progress.step
    log.start_at(start_step)
    result = _new_result(cfg, parts, log, resume_path, start_step)
    log.log(start_step, {"peak_host_memory_mib": parts.peak_host_memory_mib}, kind="load")  # once
    throughput = Throughput(cfg, parts, ctx.device)
    log.message(_start_line(cfg, ctx, parts, resume_path, start_step))
    if reference_note:
        log.message(reference_note)
    result.val_before = tracker.evaluate_baseline(start_step)["loss"]
    result.baseline = _scalars(tracker.baseline)

    strategy.train(True)
    throughput.start()
    consecutive_bad = 0
    for step in range(start_step + 1, parts.total_steps + 1):
        hooks.step_begins(step, ctx.rank)
        with throughput.paused():  # a finished background save: the commit is not training
            checkpointer.commit_finished_save()
        micro_batches = loader.next_step()
        if micro_batches is None:  # same answer on every rank: the cursor is global
            result.stopped_reason = "end of data"
            break
        outcome = train_step(step, micro_batches, strategy=strategy, task=task, rank=ctx.rank,
                             world_size=ctx.world_size, max_grad_norm=cfg.train.max_grad_norm,
                             stop_requested=stop_request.requested, hooks=hooks)
        progress.step, result.steps = step, step
        progress.tokens_seen += throughput.tokens_per_step
        if outcome.applied:
            consecutive_bad = 0
            result.losses.append(outcome.loss)
            throughput.count_step(outcome.targets)
            if step % cfg.metrics.log_every == 0 or step == parts.total_steps:
                _log_step(log, step, outcome, strategy, throughput, checkpointer)
        else:
            consecutive_bad += 1
            result.skipped_steps.append(step)
            if _stops_on_nonfinite(cfg, ctx.rank, step, outcome, consecutive_bad):
                result.stopped_reason = f"non-finite {outcome.nonfinite} at step {step}"
                break
        log.advance(1)
        if tracker.due(step, parts.total_steps) and not outcome.stop_requested:
            with throughput.paused():
                early_stop = _evaluate(cfg, step, tracker, checkpointer)
            if early_stop:
                result.stopped_reason = early_stop
                break
        if outcome.stop_requested:
            with throughput.paused():
                checkpointer.save(step, blocking=True)
            result.stopped_reason = f"preempted at step {step} (checkpoint saved)"
            break
        if step == cfg.train.stop_at_step:
            with throughput.paused():
                checkpointer.save(step)
            result.stopped_reason = f"stop_at_step {step}"
            break
        if checkpointer.due(step, parts.total_steps) and checkpointer.last_saved_step != step:
            with throughput.paused():
                checkpointer.save(step)

    result.tokens_per_s = throughput.overall()
    _finish(cfg, result, tracker, checkpointer, stop_request)
    result.wall_seconds = throughput.wall_seconds()
    log.close(asdict(result))
    if ctx.is_main:
        (cfg.output_dir / "result.json").write_text(json.dumps(asdict(result), indent=1))
        _write_report(cfg.output_dir)
        _print_summary(result, cfg)
    return result


def _finish(cfg: RunConfig, result: TrainResult, tracker: EvalTracker, checkpointer, stop_request) -> None:
    if result.stopped_reason.startswith("preempted"):
        # A preempted job has seconds left: the checkpoint is what matters. The handlers stay
        # installed otherwise: a signal arriving after the last step only sets a flag nobody
        # reads, where the default action would kill a run that already finished.
        checkpointer.close()
        stop_request.ignore_further()
        return
    if tracker.last_step != result.steps:
        tracker.evaluate(result.steps)
    result.val_after = tracker.latest["loss"]
    _finish_evaluation(cfg, result, tracker, checkpointer)
    checkpointer.close()


class Throughput:
    """Tokens per second over the time spent training: evaluations (the baseline runs before
    ``start``) and the loop's share of checkpoint saves and commits are left out."""

    def __init__(self, cfg: RunConfig, parts, device):
        self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        self.seq_len = cfg.data.seq_len
        per_position = flops_per_token(
            parts.model_config, parts.num_params, cfg.data.seq_len, trainable_params=parts.plan.trainable_params,
            forward_only_layers=(parts.plan.num_blocks - cfg.finetune.train_last_blocks
                                 if cfg.finetune.strategy == "frozen_head" else 0))
        # A head that runs on the loss positions only costs its FLOPs there, not at every position:
        # counted at every position, a chat SFT run's MFU came out above 1.
        head = getattr(parts.task, "head_on_targets_only", lambda model: None)(parts.strategy.model)
        self.head_flops_per_target = 0.0
        if head is not None:
            self.head_flops_per_target = head_flops_per_position(parts.model_config, head.weight.requires_grad)
        self.flops_per_position = per_position - self.head_flops_per_target
        self.peak_flops = all_reduce_sum([peak_flops_per_rank(device, cfg.metrics.peak_tflops_per_rank)], device)[0]
        self.trained_steps = 0

    def start(self) -> None:
        self.run_start = self.window_start = time.perf_counter()
        self.paused_seconds = 0.0
        self.window_tokens = 0
        self.window_flops = 0.0

    def count_step(self, targets: float) -> None:
        self.trained_steps += 1
        self.window_tokens += self.tokens_per_step
        self.window_flops += self.tokens_per_step * self.flops_per_position + targets * self.head_flops_per_target

    @contextmanager
    def paused(self):
        paused_at = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - paused_at
            self.window_start += spent
            self.paused_seconds += spent

    def window(self) -> dict[str, float]:
        """Rates since the last call (the logging window), then start a new window."""
        seconds = max(time.perf_counter() - self.window_start, 1e-9)
        tokens_per_s, flops_per_s = self.window_tokens / seconds, self.window_flops / seconds
        self.window_start, self.window_tokens, self.window_flops = time.perf_counter(), 0, 0.0
        return {
            "tokens_per_s": tokens_per_s,
            "samples_per_s": tokens_per_s / self.seq_len,
            "mfu": flops_per_s / self.peak_flops if self.peak_flops else 0.0,
        }

    def overall(self) -> float:
        seconds = time.perf_counter() - self.run_start - self.paused_seconds
        return self.trained_steps * self.tokens_per_step / max(seconds, 1e-9)

    def wall_seconds(self) -> float:
        return time.perf_counter() - self.run_start


def _new_result(cfg: RunConfig, parts, log: MetricsLogger, resume_path, start_step: int) -> TrainResult:
    return TrainResult(
        steps=start_step, start_step=start_step, log_dir=str(log.tensorboard_dir), task=cfg.task,
        finetune=cfg.finetune.strategy, total_params=parts.plan.total_params,
        trainable_params=parts.plan.trainable_params, eval_metric=cfg.eval_metric,
        resumed_from=str(resume_path) if resume_path else None,
        peak_host_memory_mib=parts.peak_host_memory_mib,
    )


def _start_line(cfg: RunConfig, ctx, parts, resume_path, start_step: int) -> str:
    return (
        f"shardtune: {parts.strategy.name} on {ctx.world_size} rank(s) ({ctx.backend}), "
        f"{parts.num_params / 1e6:.2f}M parameters, {parts.total_steps} steps of "
        f"{cfg.train.global_batch_size} x {cfg.data.seq_len} tokens, grad accumulation "
        f"{parts.loader.grad_accum_steps}"
        + (f", resumed from {resume_path} at step {start_step}" if resume_path else "")
        + f"\n{parts.plan.describe()}; model load: {parts.strategy.load_note}, "
        f"peak host memory {parts.peak_host_memory_mib:.0f} MiB per rank"
    )


def _log_step(log: MetricsLogger, step: int, outcome, strategy, throughput: Throughput, checkpointer) -> None:
    rates = throughput.window()
    log.log(step, {
        "loss": outcome.loss,
        "lr": strategy.current_lr(),
        "grad_norm": outcome.grad_norm,
        **rates,
        "peak_memory_mib": peak_memory_mib(strategy.ctx.device),
        "checkpoint_blocking_s": checkpointer.last_blocking_s,
    })
    log.advance(0, {"loss": outcome.loss, "tok/s": rates["tokens_per_s"]})


def _stops_on_nonfinite(cfg: RunConfig, rank: int, step: int, outcome, consecutive_bad: int) -> bool:
    stop = cfg.train.on_nonfinite == "stop" or consecutive_bad >= cfg.train.max_consecutive_nonfinite
    # Every rank reports its own decision: the proof that they all agreed is in each log.
    print(
        f"[rank {rank}] step {step}: non-finite {outcome.nonfinite} on "
        f"{outcome.bad_ranks or 'some'} rank(s); {'stopping' if stop else 'update skipped'}",
        file=sys.stderr, flush=True,
    )
    return stop


def _evaluate(cfg: RunConfig, step: int, tracker: EvalTracker, checkpointer) -> str | None:
    """Evaluate (saving the step when it is the best so far); the early-stopping reason, if any."""
    metrics = tracker.evaluate(step)
    if metrics["improved"] and cfg.eval.save_best:
        checkpointer.pinned = {step}  # retention keeps the best checkpoint
        tracker.best_checkpoint = str(checkpointer.root / step_dir_name(step))
        checkpointer.save(step)
    if not metrics["stop"]:
        return None
    return (
        f"early stopping at step {step}: val {tracker.metric} did not improve for {cfg.eval.patience} "
        f"evaluations (best {tracker.best[tracker.metric]:.4f} at step {tracker.best_step})"
    )


def _scalars(metrics: dict | None) -> dict | None:
    if metrics is None:
        return None
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _finish_evaluation(cfg, result: TrainResult, tracker: EvalTracker, checkpointer) -> None:
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
            f"  model           {_model_name(cfg)}, {cfg.finetune.strategy} fine-tune, "
            f"{result.trainable_params:,} of {result.total_params:,} parameters trained",
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


def _model_name(cfg: RunConfig) -> str:
    if cfg.model.name_or_path:
        return cfg.model.name_or_path
    return f"{cfg.model.config.get('model_type', 'model')} built from model.config"


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
