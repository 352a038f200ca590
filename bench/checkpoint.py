"""Checkpoint benchmark: save/load (sync and async), loop-blocked time, reshard 2->3,
next to plain torch.save of a full state dict. Not part of the test suite.

    .venv/bin/python bench/checkpoint.py            # demo model and a ~100M Llama
    .venv/bin/python bench/checkpoint.py --quick    # demo model only
    .venv/bin/python bench/checkpoint.py --models llama-100M --skip-reshard

"Loop blocked" is what the training loop waits for in a steady-state asynchronous save: the
``save()`` call (staging into the reused buffer) plus the commit on the loop thread; the first
asynchronous save of a run, which also allocates the buffer, is reported beside it.

Writes bench/results/checkpoint-cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEMO = str(ROOT / "configs" / "demo-cpu.yaml")
MODELS = {
    "demo-4M": [],
    "llama-100M": [
        "model.config.hidden_size=768", "model.config.intermediate_size=2048",
        "model.config.num_hidden_layers=12", "model.config.num_attention_heads=12",
        "model.config.num_key_value_heads=12",
    ],
}
COMMON = ["metrics.progress_bar=false", "data.synthetic.num_records=2000", "train.micro_batch_size=2",
          "train.global_batch_size=12", "data.seq_len=128"]


def run_worker(nproc: int, mode: str, overrides: list[str], env_extra: dict[str, str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = fh.name
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore", **env_extra)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(ROOT / "bench" / "checkpoint_worker.py"), DEMO, mode, out, *COMMON, *overrides]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads(Path(out).read_text())


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=None)
    parser.add_argument("--skip-reshard", action="store_true", help="no 2->3 reshard load runs")
    args = parser.parse_args()
    names = args.models or (["demo-4M"] if args.quick else list(MODELS))
    models = {name: MODELS[name] for name in names}
    repeats = 1 if args.quick else args.repeats
    rows = {}
    for name, model_overrides in models.items():
        for strategy in ("ddp", "fsdp"):
            runs, reshards = [], []
            for _ in range(repeats):
                with tempfile.TemporaryDirectory() as tmp:
                    overrides = [*model_overrides, f"distributed.strategy={strategy}", f"run.output_dir={tmp}/run"]
                    runs.append(run_worker(2, "save", overrides, {}))
                    if not args.skip_reshard:
                        reshards.append(run_worker(
                            3, "reshard", [*model_overrides, f"distributed.strategy={strategy}",
                                           f"run.output_dir={tmp}/run3"],
                            {"BENCH_RESHARD_FROM": f"{tmp}/run/checkpoints/step-00000003"},
                        ))
            row = {k: median_of(runs, k) for k in runs[0] if isinstance(runs[0][k], (int, float))}
            row["reshard_2_to_3_load_s"] = median_of(reshards, "reshard_load_s") if reshards else float("nan")
            row["params"] = runs[0]["params"]
            row["async_blocked_fraction_of_sync"] = row["async_blocked_s"] / row["sync_save_s"]
            rows[f"{name}/{strategy}"] = row
            print(name, strategy, json.dumps({k: round(v, 4) for k, v in row.items()}), flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_1min_at_end": os.getloadavg()[0]},
        "repeats": repeats, "note": "2 ranks (gloo, CPU), checkpoints on local disk; medians",
        "results": rows,
    }
    (RESULTS / "checkpoint-cpu.json").write_text(json.dumps(payload, indent=1))
    lines = [
        "| model / strategy | state | sync save | async: loop blocked (staging + commit) | first async: blocked | "
        "async: committed | load | reshard 2→3 load | torch.save (rank 0) | torch.load | blocked / sync |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in rows.items():
        lines.append(
            f"| {key} | {r.get('checkpoint_bytes', 0) / 2**20:.0f} MiB | {r['sync_save_s']:.2f} s | "
            f"{r['async_blocked_s']:.3f} s ({r['async_save_call_s']:.3f} + {r['async_commit_s']:.3f}) | "
            f"{r['first_async_blocked_s']:.3f} s | {r['async_total_s']:.2f} s | {r['load_s']:.2f} s | "
            f"{r['reshard_2_to_3_load_s']:.2f} s | {r['torch_save_s']:.2f} s | {r['torch_load_s']:.2f} s | "
            f"{100 * r['async_blocked_fraction_of_sync']:.0f}% |"
        )
    table = "\n".join(lines) + "\n"
    (RESULTS / "checkpoint-cpu.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
