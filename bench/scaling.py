#!/usr/bin/env python
"""Many-rank behaviour on one CPU box: 1..16 gloo ranks of the tiny model, oversubscribed.

For each strategy and world size N in 1, 2, 4, 8, 16 (one thread per rank), a fresh run
(bench/scaling_worker.py) takes S optimizer steps of a fixed global batch, evaluating and
saving synchronously after step K, then loads that checkpoint back. Then the 16-rank
checkpoint is loaded at 8 ranks and the 8-rank one at 16 (resharding both ways), and
training continues to step S; the continued losses must equal the uninterrupted run's
within RESHARD_REL_TOLERANCE.

The machine has 2 cores, so above 2 ranks the ranks share them: wall time per step then
measures the CPU sharing as much as shardtune. The worker also records the CPU seconds
all ranks consumed per phase; the report splits the wall time into "work" (CPU seconds /
cores in use) and "waiting" so the overhead of more ranks is visible on its own.

    .venv/bin/python bench/scaling.py                         # ddp and fsdp (~10 min)
    .venv/bin/python bench/scaling.py --strategies ddp,fsdp,zero3
    .venv/bin/python bench/scaling.py --quick                 # 1, 2, 4 ranks of ddp (smoke)

Writes bench/results/scaling-cpu.json, scaling-cpu.md and scaling-cpu.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from throughput_machine import LoadMeter, base_env

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
# Global batch 16 at micro-batch 1 divides over every world size up to 16 (one micro-batch
# per rank at 16); the data cursor and the global token-mean loss make every world size
# take the same optimisation steps.
COMMON = ["train.global_batch_size=16", "train.micro_batch_size=1", "train.warmup_steps=2",
          "metrics.trackers=[jsonl]"]
SAVE_STEP, TOTAL_STEPS = 5, 10
# Same bound as tests/test_checkpoint.py: reductions in another order agree to ~1e-7.
RESHARD_REL_TOLERANCE = 1e-5
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_worker(nproc: int, mode: str, run_dir: Path, strategy: str, env_extra: dict | None = None) -> dict:
    out = run_dir.with_suffix(".json")
    env = base_env()
    env.update(OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(ROOT / "bench" / "scaling_worker.py"), str(TINY), mode, str(out), str(SAVE_STEP),
           str(TOTAL_STEPS), *COMMON, f"distributed.strategy={strategy}", f"run.output_dir={run_dir}"]
    with LoadMeter() as load:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if not out.is_file():
        raise RuntimeError(f"{strategy} x{nproc} {mode} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    result.update(process_wall_s=load.wall, other_load=load.foreign_frac)
    return result


def max_rel_diff(a: dict, b: dict) -> float:
    common = sorted(set(a) & set(b), key=int)
    if not common:
        raise ValueError("no common steps to compare")
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in common)


def measure(strategy: str, worlds: list[int], tmp: Path) -> dict:
    fresh = {}
    for n in worlds:
        fresh[n] = run_worker(n, "fresh", tmp / f"{strategy}-{n}", strategy)
        r = fresh[n]
        print(f"  {strategy} x{n:<2} step {r['step_s']:.3f} s (cpu {r['step_cpu_s']:.3f}), eval "
              f"{r['eval_s']:.3f}, save {r['save_s']:.3f}, load {r['load_s']:.3f}, .metadata "
              f"{r['metadata_bytes']} B, other load {r['other_load']:.0%}", flush=True)
    reference = fresh[worlds[0]]["losses"]
    out = {"fresh": fresh, "resume": {},
           "max_rel_diff_vs_1_rank": {n: max_rel_diff(fresh[n]["losses"], reference) for n in worlds}}
    pairs = [(a, b) for a, b in ((16, 8), (8, 16)) if a in worlds and b in worlds]
    if not pairs and len(worlds) >= 2:
        pairs = [(worlds[-1], worlds[-2])]
    for src, dst in pairs:
        source = tmp / f"{strategy}-{src}" / "checkpoints" / f"step-{SAVE_STEP:08d}"
        r = run_worker(dst, "resume", tmp / f"{strategy}-{src}to{dst}", strategy,
                       {"BENCH_RESUME_FROM": str(source)})
        r["max_rel_diff_vs_uninterrupted"] = max_rel_diff(r["losses"], fresh[src]["losses"])
        r["equal_within_tolerance"] = r["max_rel_diff_vs_uninterrupted"] <= RESHARD_REL_TOLERANCE
        out["resume"][f"{src}->{dst}"] = r
        print(f"  {strategy} reshard {src}->{dst}: load {r['load_s']:.3f} s, continued losses max rel diff "
              f"{r['max_rel_diff_vs_uninterrupted']:.2e} ({'ok' if r['equal_within_tolerance'] else 'MISMATCH'})",
              flush=True)
    return out


def active_cores(n: int) -> int:
    return min(n, CORES)


def markdown(payload: dict) -> str:
    lines = [
        f"# Many-rank simulation on {CORES} CPU cores (gloo, 1 thread per rank)",
        "",
        f"Tiny Llama ({payload['params']:,} parameters), global batch 16 x seq 128, micro-batch 1, "
        f"{TOTAL_STEPS} steps; evaluation and a synchronous save after step {SAVE_STEP}; medians of steps 2..{TOTAL_STEPS}. "
        f"Command: `{payload['command']}`.",
        "",
        "| strategy | ranks | step wall s | step CPU s (all ranks) | CPU s per rank | work s = CPU / min(N, cores) "
        "| waiting s = wall - work | rank 0 / busiest other rank (CPU) | eval s | save s | load s | .metadata B "
        "| manifest B | files | other load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for strategy, res in payload["results"].items():
        for n, r in sorted(res["fresh"].items(), key=lambda kv: int(kv[0])):
            n = int(n)
            work = r["step_cpu_s"] / active_cores(n)
            lines.append(
                f"| {strategy} | {n} | {r['step_s']:.3f} | {r['step_cpu_s']:.3f} | {r['step_cpu_s'] / n:.3f} | "
                f"{work:.3f} | {max(0.0, r['step_s'] - work):.3f} | {ratio(r)} | {r['eval_s']:.3f} | {r['save_s']:.3f} | "
                f"{r['load_s']:.3f} | {r['metadata_bytes']:,} | {r['manifest_bytes']:,} | {r['checkpoint_files']} | "
                f"{r['other_load']:.0%} |"
            )
    lines += ["", "Resharding (checkpoint of step "
              f"{SAVE_STEP} loaded at another world size, then steps {SAVE_STEP + 1}..{TOTAL_STEPS}):", "",
              "| strategy | saved at -> loaded at | load s | max rel. diff of continued losses vs uninterrupted | within 1e-5 |",
              "|---|---|---:|---:|---|"]
    for strategy, res in payload["results"].items():
        for pair, r in res["resume"].items():
            lines.append(f"| {strategy} | {pair} | {r['load_s']:.3f} | {r['max_rel_diff_vs_uninterrupted']:.1e} | "
                         f"{'yes' if r['equal_within_tolerance'] else 'NO'} |")
    lines += ["", "Loss agreement across world sizes (max rel. diff of all step losses vs 1 rank): " + "; ".join(
        f"{s}: " + ", ".join(f"{n}: {d:.1e}" for n, d in res["max_rel_diff_vs_1_rank"].items())
        for s, res in payload["results"].items()), ""]
    lines += growth_lines(payload)
    loads = [r["other_load"] for res in payload["results"].values() for r in res["fresh"].values()]
    lines.append(EXPLANATION.strip().replace("{load}", f"{min(loads):.0%}-{max(loads):.0%}"))
    return "\n".join(lines) + "\n"


def ratio(r: dict) -> str:
    value = r.get("rank0_over_max_other_cpu")
    return "-" if value is None or r["world_size"] == 1 else f"{value:.2f}"


EXPLANATION = """
How to read this. The global batch is fixed, so every world size does the same arithmetic
per step. With N ranks on 2 cores, at most min(N, 2) ranks compute at once:

* *step CPU s (all ranks)* is the work the step cost, summed over every process (gloo's
  threads included). Flat = ranks cost nothing extra; growth = what more ranks add:
  collectives (a ring all-gather or all-reduce over N ranks is N-1 rounds), the optimizer
  update DDP replicates on every rank, and per-rank fixed costs (one forward/backward call
  per micro-batch, Python overhead). This column is what a real cluster pays per step,
  spread over N devices.
* *work s = CPU / min(N, cores)* is the wall time that work needs on the cores it can use;
  *waiting s* is the rest of the wall time: ranks descheduled while others run, time slices
  lost to barrier hand-offs, and other jobs on the machine (*other load*: share of the CPUs
  that other processes used during the run). Above 2 ranks, waiting is CPU sharing, not
  shardtune; on real hardware each rank has its own device and this column disappears.
* *CPU s per rank* is what one device would spend: it falls with N as the per-rank share of
  the batch falls, down to the floor of per-step fixed costs.
* *rank 0 / busiest other rank* compares rank 0's CPU per step with the busiest of the other
  ranks. Rank 0 writes metrics and commits checkpoints, but per step it must do no work that
  grows with the world size: this ratio staying near 1 as N grows is the check.
* Checkpoint metadata (`.metadata`, DCP's index of every chunk; `manifest.json`,
  shardtune's per-file sizes and sha256) may grow with the number of shards, at most linearly:
  FSDP2 splits every tensor into N chunks (N index entries per tensor), DDP's replicated
  tensors are written once (one entry each), shardtune's ZeRO checkpoints give each whole
  tensor to one rank (one entry each), and the manifest gains two files per rank (the
  rank's shard and its RNG state).
* Noise: the runs shared the 2 cores with other jobs (*other load*, {load} in this
  run), which inflates wall times unevenly; the CPU-second columns are far less
  sensitive to it. Compare shapes of curves, not single cells.
"""


def growth_lines(payload: dict) -> list[str]:
    out = ["Metadata growth per added rank (bytes, from the smallest to the largest world size measured):", ""]
    for strategy, res in payload["results"].items():
        fresh = {int(n): r for n, r in res["fresh"].items()}
        lo, hi = min(fresh), max(fresh)
        if hi == lo:
            continue
        for key in ("metadata_bytes", "manifest_bytes"):
            per_rank = (fresh[hi][key] - fresh[lo][key]) / (hi - lo)
            out.append(f"* {strategy} {key.split('_')[0]}: {fresh[lo][key]:,} B at {lo} -> {fresh[hi][key]:,} B at "
                       f"{hi} ranks, {per_rank:,.0f} B per added rank ({fresh[hi][key] / fresh[lo][key]:.2f}x for "
                       f"{hi / lo:.0f}x ranks)")
    return out + [""]


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [
        (axes[0][0], "optimizer step (s)", [("step_s", "wall", "-o"), ("work", "work = CPU s / cores used", "--x")]),
        (axes[0][1], "CPU seconds per step, all ranks", [("step_cpu_s", "CPU s", "-o")]),
        (axes[1][0], "evaluation / save / load (s)", [("eval_s", "eval", "-o"), ("save_s", "save", "-s"),
                                                      ("load_s", "load", "-^")]),
        (axes[1][1], "checkpoint metadata (bytes)", [("metadata_bytes", ".metadata", "-o"),
                                                     ("manifest_bytes", "manifest.json", "-s")]),
    ]
    for ax, title, series in panels:
        for strategy, res in payload["results"].items():
            fresh = {int(n): r for n, r in res["fresh"].items()}
            ns = sorted(fresh)
            for key, label, style in series:
                if key == "work":
                    ys = [fresh[n]["step_cpu_s"] / active_cores(n) for n in ns]
                else:
                    ys = [fresh[n][key] for n in ns]
                ax.plot(ns, ys, style, label=f"{strategy} {label}")
        if ax is not axes[1][1]:  # metadata on a linear axis, where linear growth is a line
            ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8, 16], ["1", "2", "4", "8", "16"])
        ax.set_xlabel("ranks (2 cores: oversubscribed above 2)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategies", default="ddp,fsdp")
    parser.add_argument("--worlds", default="1,2,4,8,16")
    parser.add_argument("--quick", action="store_true", help="1, 2, 4 ranks of ddp; numbers meaningless")
    parser.add_argument("--out", default=str(RESULTS / "scaling-cpu"))
    parser.add_argument("--report-only", action="store_true", help="redraw .md and .png from the .json")
    args = parser.parse_args()
    out = Path(args.out)
    if args.report_only:
        payload = json.loads(out.with_suffix(".json").read_text())
        out.with_suffix(".md").write_text(markdown(payload))
        plot(payload, out.with_suffix(".png"))
        return
    strategies = ["ddp"] if args.quick else args.strategies.split(",")
    worlds = [1, 2, 4] if args.quick else [int(n) for n in args.worlds.split(",")]
    started = time.time()
    results = {}
    with tempfile.TemporaryDirectory(prefix="shardtune-scaling-") as tmp:
        for strategy in strategies:
            results[strategy] = measure(strategy, worlds, Path(tmp))
    first = next(iter(results.values()))["fresh"]
    payload = {
        "machine": {"cores": CORES, "platform": platform.platform(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "command": "python bench/scaling.py " + " ".join(sys.argv[1:]),
        "params": first[worlds[0]]["params"], "save_step": SAVE_STEP, "total_steps": TOTAL_STEPS,
        "reshard_rel_tolerance": RESHARD_REL_TOLERANCE, "bench_seconds": time.time() - started,
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    out.with_suffix(".md").write_text(markdown(json.loads(json.dumps(payload))))
    plot(json.loads(json.dumps(payload)), out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())
    bad = [f"{s} {p}" for s, res in results.items() for p, r in res["resume"].items() if not r["equal_within_tolerance"]]
    if bad:
        sys.exit(f"continued losses differ from the uninterrupted run: {', '.join(bad)}")


if __name__ == "__main__":
    main()
