#!/usr/bin/env python
"""CPU training throughput: shardtune's strategies vs Hugging Face ``Trainer``, MFU, scaling.

What it measures (every run sequential: the machine has two cores):

* the machine's fp32 matmul rate (1024x1024 matmuls) with 1 thread, 2 threads in one
  process, and two 1-thread processes at once: the peak each run layout is compared to;
* shardtune tokens/s for ddp, fsdp, zero1, zero2 and zero3 on the demo model and on a
  ~21M-parameter Llama, at 1 rank x 2 threads (the 1-rank default) and 2 ranks x 1 thread,
  plus ddp at 1 rank x 1 thread for the 1 -> 2 rank scaling efficiency;
* Hugging Face ``Trainer`` (bench/hf_trainer_worker.py) on the same model, weights, tokenizer
  and packed sequences, same micro/global batch and seq len, at the same layouts (2 ranks
  through torchrun, DDP);
* (full mode, ``--compile``) shardtune with ``train.compile=blocks``.

Throughput is steady state: the first ``--warmup`` steps are dropped, the rest are timed in
windows of ``--window`` steps (shardtune: its own metrics.jsonl windows; HF: step-end times
from a callback), and a row is the median over the windows of all its runs (``--repeats``
runs for the rows the targets use, ``--repeats-other`` for the rest). Other processes'
CPU use during each run is recorded; before each run the bench waits (up to
``--max-idle-wait`` s) for the machine to go idle.

    .venv/bin/python bench/throughput.py            # full run (~20 min on 2 cores)
    .venv/bin/python bench/throughput.py --quick    # smoke check (~2 min, numbers meaningless)

Results: bench/results/throughput-cpu.json and bench/results/throughput-cpu.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from throughput_jobs import (
    DATA_OVERRIDES,
    DEPS,
    MODELS,
    QUICK_DATA_OVERRIDES,
    RESULTS,
    ROOT,
    STRATEGIES,
    Job,
    Measurement,
    ModelSpec,
    Plan,
    run_job,
)
from throughput_machine import (
    _IDLE_BUDGET,
    MATMUL_SIZE,
    base_env,
    machine_info,
    matmul_probe,
    measure_matmul,
    peak_rates,
    wait_for_idle,
)
from throughput_report import analyse, markdown


class _VocabOnly:
    """Enough of a tokenizer for shardtune's build_model: the vocab size and special ids."""

    bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def model_facts(spec: ModelSpec, data_overrides: list[str]) -> dict:
    import torch

    from shardtune.config import load_config
    from shardtune.models.loading import build_model, count_parameters
    from shardtune.train.metrics import flops_per_token

    cfg = load_config(None, [*data_overrides, *spec.overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model, _VocabOnly(cfg.tokenizer.vocab_size))
    params, _ = count_parameters(model)
    fpt = flops_per_token(model.config, params, cfg.data.seq_len)
    return {
        "label": spec.label,
        "overrides": spec.overrides,
        "params": params,
        "config": {k: getattr(model.config, k) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "tie_word_embeddings")},
        "seq_len": cfg.data.seq_len,
        "micro_batch_size": cfg.train.micro_batch_size,
        "global_batch_size": cfg.train.global_batch_size,
        "tokens_per_step": cfg.train.global_batch_size * cfg.data.seq_len,
        "flops_per_token": fpt,
        "num_records": cfg.data.synthetic.num_records,
        "data_overrides": data_overrides,
    }


# --------------------------------------------------------------------------------------

def prepare_tokenizer(tokenizer_dir: Path, env: dict[str, str], data_overrides: list[str]) -> None:
    """The byte-level BPE shardtune trains for this data config, saved once for the HF worker."""
    if (tokenizer_dir / "tokenizer.json").is_file():
        return
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from shardtune.config import load_config\n"
        "from shardtune.data.corpus import load_records, record_text\n"
        "from shardtune.models.loading import train_tokenizer\n"
        "cfg = load_config(None, sys.argv[2:])\n"
        "train_tokenizer((record_text(r) for r in load_records(cfg.data, cfg.run.seed)),"
        " cfg.tokenizer.vocab_size, Path(sys.argv[1]))\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tokenizer_dir), *data_overrides], env=env, cwd=ROOT, check=True)


def ensure_accelerate(env: dict[str, str]) -> str:
    """HF Trainer needs accelerate, which the project venv does not have: install it beside it."""
    if importlib.util.find_spec("accelerate") is not None:
        import accelerate

        return accelerate.__version__
    if not (DEPS / "accelerate").is_dir():
        print(f"installing accelerate into {DEPS} (for HF Trainer only; the project venv is not touched)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(DEPS),
                        "accelerate>=1.1"], check=True)
    out = subprocess.run([sys.executable, "-c", "import accelerate; print(accelerate.__version__)"],
                         env=dict(env, PYTHONPATH=str(DEPS)), capture_output=True, text=True, check=True)
    return out.stdout.strip()


# --------------------------------------------------------------------------------------
# Job lists


def build_jobs(args) -> list[Job]:
    """The measurements, each with its number of repeats.

    The rows the issue's targets are read from (shardtune ddp and HF Trainer on the larger
    model, every layout) get ``--repeats`` runs; the rest ``--repeats-other``.
    """
    big = args.models[-1]
    jobs: list[Job] = []
    for model in args.models:
        for strategy in args.strategies:
            layouts = ["1p2t", "2p1t"] if (strategy == "ddp" or not args.quick) else ["2p1t"]
            if strategy in args.one_thread_strategies:
                layouts.insert(1, "1p1t")
            jobs += [Job(model, "shardtune", strategy, int(lay[0]), int(lay[2])) for lay in layouts]
        if not args.skip_hf:
            # HF at 1 thread only on the model the targets use (its own scaling, for reference).
            layouts = ["1p2t", "1p1t", "2p1t"] if (model == big and not args.quick) else ["1p2t", "2p1t"]
            jobs += [Job(model, "hf", "ddp", int(lay[0]), int(lay[2])) for lay in layouts]
        if args.compile and model in args.compile_models:
            jobs += [Job(model, "shardtune+compile", "ddp", 1, 2), Job(model, "shardtune+compile", "ddp", 2, 1)]
    for job in jobs:
        key = job.model == big and (job.impl == "hf" or (job.impl == "shardtune" and job.strategy == "ddp"))
        job.repeats = args.repeats if key else args.repeats_other
        job.target_row = key
    return jobs



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke check: demo model, few steps, 1 repeat (~2 min)")
    p.add_argument("--repeats", type=int, default=None,
                   help="runs of each measurement the targets use (ddp and HF on the larger model); median reported")
    p.add_argument("--repeats-other", type=int, default=None, help="runs of every other measurement")
    p.add_argument("--warmup", type=int, default=None, help="optimizer steps dropped before timing")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps timed after the warm-up")
    p.add_argument("--window", type=int, default=None, help="steps per timing window (metrics.log_every)")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None)
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=None)
    p.add_argument("--one-thread-strategies", nargs="*", choices=STRATEGIES, default=None,
                   help="strategies also measured at 1 rank x 1 thread (for scaling efficiency)")
    p.add_argument("--skip-hf", action="store_true", help="no Hugging Face Trainer reference")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also run shardtune with train.compile=blocks (ddp only)")
    p.add_argument("--compile-models", nargs="+", choices=sorted(MODELS), default=None)
    p.add_argument("--max-idle-wait", type=float, default=None,
                   help="seconds to wait for other processes to leave the CPUs idle before each run")
    p.add_argument("--retry-noisy", type=float, default=None,
                   help="run a measurement once more when other processes used more than this fraction of the CPUs")
    p.add_argument("--max-retries", type=int, default=None,
                   help="noisy-run retries allowed in the whole benchmark for rows the targets do not use")
    p.add_argument("--idle-wait-budget", type=float, default=None,
                   help="total seconds the benchmark may spend waiting for an idle machine")
    p.add_argument("--job-timeout", type=float, default=None, help="seconds before one run is killed")
    p.add_argument("--out", type=Path, default=None, help="JSON result path (the .md goes beside it)")
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench-throughput")
    p.add_argument("--_matmul", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_samples", type=int, default=5, help=argparse.SUPPRESS)
    p.add_argument("--_start-at", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    quick = args.quick
    defaults = dict(
        repeats=1,
        repeats_other=1,
        warmup=2 if quick else 4,
        steps=2 if quick else 16,
        window=2 if quick else 4,
        models=["demo"] if quick else ["demo", "llama21m"],
        strategies=list(STRATEGIES),
        one_thread_strategies=["ddp"],
        compile=False if quick else True,
        compile_models=["llama21m"],
        max_idle_wait=20.0 if quick else 120.0,
        job_timeout=180.0 if quick else 420.0,
        retry_noisy=1.0 if quick else 0.3,
        max_retries=0 if quick else 4,
        idle_wait_budget=60.0 if quick else 300.0,
        out=RESULTS / ("throughput-cpu-quick.json" if quick else "throughput-cpu.json"),
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps % args.window or args.warmup % args.window:
        p.error("--warmup and --steps must be multiples of --window")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._matmul is not None:
        matmul_probe(args._matmul, args._samples, args._start_at)
        return 0

    os.environ.update({k: v for k, v in base_env().items() if k not in os.environ})
    env = base_env()
    t_start = time.perf_counter()
    plan = Plan(warmup=args.warmup, measured=args.steps, window=args.window, timeout_s=args.job_timeout)
    mode = "quick" if args.quick else "full"
    sys.path.insert(0, str(ROOT))

    meta = machine_info()
    meta.update(mode=mode, started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), argv=sys.argv[1:])
    jobs = build_jobs(args)
    meta["accelerate"] = ensure_accelerate(env) if any(j.impl == "hf" for j in jobs) else None
    print(f"bench: {mode} mode, {len(jobs)} measurements, {sum(j.repeats for j in jobs)} runs, "
          f"{plan.warmup} warm-up + {plan.measured} timed steps each", flush=True)

    data_overrides = QUICK_DATA_OVERRIDES if args.quick else DATA_OVERRIDES
    facts = {m: model_facts(MODELS[m], data_overrides) for m in args.models}
    for f in facts.values():
        print(f"  {f['label']}: {f['params'] / 1e6:.2f}M parameters, {f['flops_per_token'] / 1e6:.1f} MFLOP/token",
              flush=True)

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = work / "tokenizer"
    shutil.rmtree(tokenizer_dir, ignore_errors=True)  # depends on DATA_OVERRIDES: never reuse a stale one
    if any(j.impl == "hf" for j in jobs):
        prepare_tokenizer(tokenizer_dir, env, data_overrides)

    samples = 2 if args.quick else 5
    matmul_rounds = []

    def matmul_round(label: str) -> None:
        print(f"matmul peak ({label}) ...", end=" ", flush=True)
        rnd = measure_matmul(samples, args.max_idle_wait)
        matmul_rounds.append(rnd)
        print(", ".join(f"{k} {max(v['rates']) / 1e9:.0f} GFLOP/s (other load {v['foreign_cpu_frac']:.0%})"
                        for k, v in rnd.items()), flush=True)

    matmul_round("start")

    measurements = [Measurement(j) for j in jobs]
    rounds = max(j.repeats for j in jobs)
    total_runs, done = sum(j.repeats for j in jobs), 0
    retries_left = args.max_retries
    _IDLE_BUDGET["left_s"] = args.idle_wait_budget
    # Peak rounds spread through the run too, so one burst of load cannot spoil the denominator.
    probe_after = set() if args.quick else {total_runs // 3, 2 * total_runs // 3}
    for rep in range(rounds):  # interleaved: round r runs every measurement that wants an r-th repeat
        for m in measurements:
            job = m.job
            if rep >= job.repeats:
                continue
            if done in probe_after:
                probe_after.discard(done)
                matmul_round(f"after {done} runs")
            done += 1
            idle = wait_for_idle(args.max_idle_wait)
            print(f"[{done}/{total_runs}] {job.id} (run {rep + 1}/{job.repeats}) ...", end=" ", flush=True)
            record = run_job(job, facts[job.model], plan, work, rep, tokenizer_dir)
            record.update(idle)
            # Target rows always get their retry; the others share --max-retries.
            if record["rc"] == 0 and record["foreign_cpu_frac"] > args.retry_noisy and (
                    job.target_row or retries_left > 0):
                retries_left -= 0 if job.target_row else 1
                # Other processes took a large share of the CPUs: keep the record, flagged, and
                # run once more. Rows use the unflagged runs (all runs if every one was noisy).
                print(f"other load {record['foreign_cpu_frac']:.0%}: run again ...", end=" ", flush=True)
                record["superseded_noisy"] = True
                m.repeats.append(record)
                wait_for_idle(args.max_idle_wait)
                record = run_job(job, facts[job.model], plan, work, rep, tokenizer_dir)
                record["retry_of_noisy_run"] = True
            m.repeats.append(record)
            if record["rc"] == 0:
                print(f"{record['tokens_per_s']:,.0f} tok/s (windows {record['window_tokens_per_s']}, "
                      f"other load {record['foreign_cpu_frac']:.0%}, {record['wall_s']:.0f} s)", flush=True)
            else:
                print(f"FAILED rc={record['rc']} (see {record['log']})\n{record.get('error', '')}", flush=True)

    matmul_round("end")
    matmul = {layout: [x for rnd in matmul_rounds for x in rnd[layout]["rates"]] for layout in ("1p1t", "1p2t", "2p1t")}
    peaks = peak_rates(matmul_rounds, args.retry_noisy)

    # A tokenizer retrained by a shardtune run must equal the one the HF worker used.
    tok_check = None
    for path in sorted(work.glob("*-shardtune-*/tokenizer/tokenizer.json")):
        if (tokenizer_dir / "tokenizer.json").is_file():
            tok_check = path.read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
        break

    rows, derived = analyse(measurements, facts, peaks)
    meta["duration_s"] = round(time.perf_counter() - t_start, 1)
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    result = {
        "meta": meta,
        "plan": {**asdict(plan), "repeats": args.repeats, "repeats_other": args.repeats_other},
        "hf_same_tokenizer_as_shardtune": tok_check,
        "matmul": {
            "size": MATMUL_SIZE,
            "samples_flops": matmul,
            "rounds": matmul_rounds,
            "median_flops": {k: statistics.median(v) for k, v in matmul.items()},
            "peak_flops": peaks,
            "note": "peak = best sample of the rounds with little other load (noise only lowers a rate); "
                    "2p1t = two 1-thread processes at once, summed",
        },
        "models": facts,
        "measurements": rows,
        **derived,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    args.out.with_suffix(".md").write_text(table)
    print()
    print(table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')} ({meta['duration_s']:.0f} s)")
    failed = sum(r["n_runs"] - r["n_ok"] for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
