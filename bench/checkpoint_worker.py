"""One rank of the checkpoint benchmark (started by bench/checkpoint.py under torchrun).

Times, on the real Checkpointer: a synchronous save, an asynchronous save (the part the
training loop is blocked for, and the time until it is committed), a load, and, as the
baseline, rank 0 writing/reading a full state dict with plain torch.save/torch.load.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from shardtune.checkpoint.trainer_state import TrainProgress
from shardtune.config import load_config
from shardtune.distributed.process_group import init_distributed, shutdown
from shardtune.tasks import CausalLMTask
from shardtune.train.components import build_checkpointer, build_run


def timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def slowest_rank(seconds: float) -> float:
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def async_save(ckpt, step: int) -> dict[str, float]:
    dist.barrier()
    start = time.perf_counter()
    ckpt.save(step)
    staged = time.perf_counter()
    while not ckpt.pending[0].done():  # the loop would be training here
        time.sleep(0.005)
    written = time.perf_counter()
    dist.barrier()
    commit_start = time.perf_counter()
    # What the loop calls at the next step: the all-reduce that agrees every rank's write (and,
    # on the writer thread, the commit) is done, then taking the outcome.
    ckpt.commit_finished_save()
    assert ckpt.pending is None, "every rank's save was done, so the outcome must have been taken"
    commit = time.perf_counter() - commit_start
    return {"save_call_s": slowest_rank(staged - start), "background_s": slowest_rank(written - staged),
            "commit_s": slowest_rank(commit), "blocked_s": slowest_rank(staged - start + commit),
            "total_s": slowest_rank(time.perf_counter() - start)}


def main() -> None:
    config, mode, out_json, *overrides = sys.argv[1:]
    cfg = load_config(config, overrides)
    ctx = init_distributed(600, 600)
    parts = build_run(cfg, ctx)
    strategy = parts.strategy
    # One real step so the optimizer holds its moments, as in any mid-run checkpoint.
    batch = parts.loader.next_step()[0]
    strategy.backward(CausalLMTask().loss_sum(strategy.model, batch, ctx.device) * 1e-3, True)
    strategy.step(1.0, skip=False)
    ckpt = build_checkpointer(cfg, ctx, parts, TrainProgress(step=1))
    results: dict[str, float] = {"world_size": ctx.world_size, "params": parts.num_params}

    if mode == "save":
        results["sync_save_s"] = timed(lambda: ckpt.save(1, blocking=True))
        # Two asynchronous saves: the first allocates the staging buffer, the second is every
        # later save of the run. The loop is blocked in save() (staging) and, briefly, when it
        # takes the outcome; the writes and the commit (manifest, rename) run in the background.
        for label, step in (("first_async", 2), ("async", 3)):
            results.update({f"{label}_{k}": v for k, v in async_save(ckpt, step).items()})
        results["load_s"] = timed(lambda: ckpt.load(cfg.checkpoint_dir / "step-00000003"))
        if ctx.is_main:
            path = Path(cfg.output_dir) / "plain.pt"
            module = strategy.unwrapped
            plain = {"model": module.state_dict(), "optim": strategy.optimizer.state_dict()}
            start = time.perf_counter()
            torch.save(plain, path)
            os.sync()
            results["torch_save_s"] = time.perf_counter() - start
            start = time.perf_counter()
            torch.load(path, weights_only=True)
            results["torch_load_s"] = time.perf_counter() - start
            results["checkpoint_bytes"] = sum(
                f.stat().st_size for f in (cfg.checkpoint_dir / "step-00000003").rglob("*") if f.is_file()
            )
    else:  # "reshard": load a checkpoint written by another world size
        source = Path(os.environ["BENCH_RESHARD_FROM"])
        results["reshard_load_s"] = timed(lambda: ckpt.load(source))
    ckpt.close()
    if ctx.is_main:
        Path(out_json).write_text(json.dumps(results))
    shutdown()


if __name__ == "__main__":
    main()
