#!/usr/bin/env python
"""GPU throughput and MFU of the ~1B Llama (configs/llama-1b-fsdp2-1gpu.yaml) on one GPU.

Every strategy, plus the throughput options one at a time, each a real ``shardtune launch``
run: bf16, random init from config, synthetic data, the config's micro/global batch. The
first ``--warmup`` steps (compilation, allocator warm-up) are dropped; a row is the median
of the per-step tokens/s and MFU that shardtune itself logs to metrics.jsonl (MFU: 6N +
attention FLOPs per token against the GPU's dense bf16 peak; recomputation is not counted
as useful work). The goal the issue sets is >= 45% MFU on one H100.

    .venv/bin/python bench/gpu_throughput.py                  # every row (~15 min on an H100)
    .venv/bin/python bench/gpu_throughput.py --rows fsdp-compile,fsdp-eager --steps 20

Writes bench/results/gpu-throughput-<gpu>.json and .md. Refuses to run without CUDA: on a
CPU these numbers would mean nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CONFIG = ROOT / "configs" / "llama-1b-fsdp2-1gpu.yaml"
MFU_GOAL = 0.45

# name -> overrides on top of the config (which is fsdp, compile=blocks, no recompute).
ROWS: dict[str, list[str]] = {
    "fsdp-compile": [],
    "fsdp-eager": ["train.compile=none"],
    "fsdp-compile-selective-ac": ["model.activation_checkpointing=selective"],
    "fsdp-compile-full-ac": ["model.activation_checkpointing=full"],
    "fsdp-compile-reshard": ["distributed.fsdp.reshard_after_forward=true"],
    "ddp-compile": ["distributed.strategy=ddp"],
    "ddp-compile-model": ["distributed.strategy=ddp", "train.compile=model"],
    "zero1-compile": ["distributed.strategy=zero1"],
    "zero2-compile": ["distributed.strategy=zero2"],
    "zero3-eager": ["distributed.strategy=zero3", "train.compile=none"],
}


def run_row(name: str, overrides: list[str], steps: int, warmup: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"gpu-{name}-") as tmp:
        cmd = [sys.executable, "-m", "shardtune", "launch", str(CONFIG), "--nproc", "1",
               f"run.output_dir={tmp}", f"train.max_steps={steps}", "metrics.log_every=1",
               "metrics.progress_bar=false", "checkpoint.at_end=false", "eval.test_at_end=false",
               "eval.save_best=false", "eval.batches=1", "data.synthetic.num_records=20000", *overrides]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - start
        metrics = Path(tmp) / "metrics.jsonl"
        if proc.returncode != 0 or not metrics.is_file():
            return {"name": name, "overrides": overrides, "error": proc.stderr[-3000:], "wall_s": wall}
        rows = [r for r in map(json.loads, metrics.read_text().splitlines()) if r["kind"] == "train"]
    timed = [r for r in rows if r["step"] > warmup]
    if not timed:
        return {"name": name, "overrides": overrides, "error": f"no steps after warm-up {warmup}", "wall_s": wall}
    return {
        "name": name, "overrides": overrides, "steps_timed": len(timed), "wall_s": wall,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "mfu": statistics.median(r["mfu"] for r in timed),
        "peak_memory_gib": max(r["peak_memory_mib"] for r in timed) / 1024,
        "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
    }


def markdown(payload: dict) -> str:
    lines = [f"# ~1B Llama on one {payload['gpu']} (bf16, {payload['config']})", "",
             f"Median of steps {payload['warmup'] + 1}..{payload['steps']}; MFU goal {MFU_GOAL:.0%}.", "",
             "| row | overrides | tokens/s | MFU | peak memory GiB | meets goal |", "|---|---|---:|---:|---:|---|"]
    for r in payload["rows"]:
        if "error" in r:
            first_line = (r["error"].strip().splitlines() or ["failed"])[-1]
            lines.append(f"| {r['name']} | {' '.join(r['overrides'])} | failed: {first_line[:120]} | | | |")
            continue
        lines.append(f"| {r['name']} | {' '.join(r['overrides']) or '(config as shipped)'} | "
                     f"{r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['peak_memory_gib']:.1f} | "
                     f"{'yes' if r['mfu'] >= MFU_GOAL else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_throughput.py: no CUDA device; nothing measured (this benchmark is for a GPU)")
    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    gpu = torch.cuda.get_device_name(0)
    rows = []
    for name in args.rows.split(","):
        row = run_row(name, ROWS[name], args.steps, args.warmup, args.timeout)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
        if "error" in row:
            print(row["error"], file=sys.stderr, flush=True)
    payload = {"gpu": gpu, "config": str(CONFIG.relative_to(ROOT)), "steps": args.steps, "warmup": args.warmup,
               "torch": torch.__version__, "platform": platform.platform(), "rows": rows}
    slug = gpu.lower().replace("nvidia ", "").replace(" ", "-")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"gpu-throughput-{slug}.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / f"gpu-throughput-{slug}.md").write_text(markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
