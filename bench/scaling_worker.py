"""One rank of the many-rank benchmark (started by bench/scaling.py under torchrun).

Runs shardtune's own parts (``build_run``, the strategy, ``evaluate``, the ``Checkpointer``)
and times each phase with a barrier on both sides, so a phase costs what its slowest rank
spent in it. The optimizer step mirrors ``shardtune.train.loop``: one all-reduce for the
step's loss-token count, micro-batches scaled to the global token mean, one all-reduce for
the loss. Besides wall time, every phase records the CPU seconds each process consumed
(``time.process_time``: all of its threads, gloo's included), summed over ranks: on an
oversubscribed machine that sum is the work, and wall time is the work spread over the cores.

    modes: fresh  -- steps 1..S with an evaluation and a synchronous save after step K,
                     then a load of that checkpoint at this world size
           resume -- load the checkpoint named by BENCH_RESUME_FROM (any world size),
                     then steps K+1..S
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from shardtune.checkpoint.trainer_state import TrainProgress
from shardtune.config import load_config
from shardtune.distributed.collectives import all_reduce_sum
from shardtune.distributed.process_group import init_distributed, shutdown
from shardtune.eval.evaluate import evaluate
from shardtune.train.components import build_checkpointer, build_run

PER_RANK_CPU: list[list[float]] = []  # every timed phase's CPU seconds, one entry per rank


def timed(fn) -> tuple[object, float, float]:
    """(result, wall seconds of the slowest rank, CPU seconds summed over ranks)."""
    dist.barrier()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    dist.barrier()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    slots = torch.zeros(dist.get_world_size(), dtype=torch.float64)
    slots[dist.get_rank()] = cpu
    dist.all_reduce(slots)
    PER_RANK_CPU.append(slots.tolist())
    return out, wall, float(slots.sum())


def train_step(parts, ctx, max_grad_norm) -> float:
    strategy, task = parts.strategy, parts.task
    micro_batches = parts.loader.next_step()
    local = sum(task.count_targets(mb) for mb in micro_batches)
    global_tokens = all_reduce_sum([float(local)], ctx.device)[0]
    scale = ctx.world_size / max(global_tokens, 1.0)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for i, batch in enumerate(micro_batches):
        is_last = i == len(micro_batches) - 1
        with strategy.micro_step(is_last):
            with strategy.autocast():
                loss = task.loss_sum(strategy.model, batch, ctx.device)
            strategy.backward(loss * scale, is_last)
        loss_sum += loss.detach().double()
    reduced = all_reduce_sum([float(loss_sum)], ctx.device)
    strategy.step(max_grad_norm, skip=False)
    return reduced[0] / max(global_tokens, 1.0)


def main() -> None:
    config, mode, out_json, save_step, total_steps, *overrides = sys.argv[1:]
    save_step, total_steps = int(save_step), int(total_steps)
    cfg = load_config(config, overrides)
    ctx = init_distributed(900, 900)
    start = time.perf_counter()
    parts = build_run(cfg, ctx)
    setup_s = time.perf_counter() - start
    strategy = parts.strategy
    strategy.train(True)
    progress = TrainProgress()
    ckpt = build_checkpointer(cfg, ctx, parts, progress)
    result: dict = {"world_size": ctx.world_size, "strategy": strategy.name, "mode": mode,
                    "params": parts.num_params, "setup_s": setup_s, "losses": {}, "steps": []}

    first = 1
    if mode == "resume":
        source = Path(os.environ["BENCH_RESUME_FROM"])
        state, wall, cpu = timed(lambda: ckpt.load(source))
        ckpt.state.load_state_dict(state)
        result.update(load_s=wall, load_cpu_s=cpu, resumed_from=str(source),
                      source_world_size=json.loads((source / "manifest.json").read_text())["world_size"])
        first = state["step"] + 1

    for step in range(first, total_steps + 1):
        loss, wall, cpu = timed(lambda: train_step(parts, ctx, cfg.train.max_grad_norm))
        per_rank = PER_RANK_CPU[-1]
        others = per_rank[1:] or per_rank
        result["losses"][step] = loss
        # Rank 0 against the busiest other rank: work on rank 0 that grew with the world size
        # (gathers, per-rank bookkeeping) would show as a ratio growing with the ranks.
        result["steps"].append({"step": step, "wall_s": wall, "cpu_s": cpu, "rank0_cpu_s": per_rank[0],
                                "max_other_cpu_s": max(others)})
        if mode == "fresh" and step == save_step:
            metrics, wall, cpu = timed(lambda: evaluate(
                strategy, parts.task, parts.val_source.epoch(0), micro_batch_size=cfg.train.micro_batch_size,
                rank=ctx.rank, world_size=ctx.world_size, max_batches=cfg.eval.batches))
            result.update(eval_s=wall, eval_cpu_s=cpu, val_loss=metrics["loss"])
            progress.step = step
            _, wall, cpu = timed(lambda step=step: ckpt.save(step, blocking=True))
            result.update(save_s=wall, save_cpu_s=cpu)

    if mode == "fresh":
        # Loading back at the same world size: the load cost without any resharding.
        path = cfg.checkpoint_dir / f"step-{save_step:08d}"
        _, wall, cpu = timed(lambda: ckpt.load(path))
        result.update(load_s=wall, load_cpu_s=cpu, checkpoint=str(path))
        if ctx.is_main:
            files = [f for f in path.rglob("*") if f.is_file()]
            result.update(
                metadata_bytes=(path / ".metadata").stat().st_size,
                manifest_bytes=(path / "manifest.json").stat().st_size,
                checkpoint_files=len(files),
                checkpoint_bytes=sum(f.stat().st_size for f in files),
            )
    timed_steps = result["steps"][1:] if len(result["steps"]) > 1 else result["steps"]
    result["step_s"] = statistics.median(s["wall_s"] for s in timed_steps)
    result["step_cpu_s"] = statistics.median(s["cpu_s"] for s in timed_steps)
    result["rank0_over_max_other_cpu"] = statistics.median(
        s["rank0_cpu_s"] / max(s["max_other_cpu_s"], 1e-9) for s in timed_steps)
    ckpt.close()
    if ctx.is_main:
        Path(out_json).write_text(json.dumps(result, indent=1))
    shutdown()


if __name__ == "__main__":
    main()
