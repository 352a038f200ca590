#!/usr/bin/env python
"""Data path on ONE core: shardtune's prepare + memory-mapped loader vs Hugging Face streaming.

Same generated data for both: multi-turn chats built from the project's synthetic instruction
pairs (shardtune/data/synthetic.py), one JSONL file; same byte-level BPE trained on it; same
chat template and assistant-only loss mask (both call shardtune's ``DocumentEncoder``); same
``seq_len`` and micro-batch. The process pins itself to one core before anything starts a
thread, and runs everything sequentially, so every ratio below is measured side by side.

* preparation: ``shardtune data prepare`` end to end (its Python API), and its tokenize step
  alone;
* training-time data path: ``GlobalBatchLoader`` over ``PreparedSource`` for one epoch (plan
  included), with prefetch workers when shardtune has ``data.num_workers``; next to
  ``datasets`` streaming: load_dataset("json", streaming=True) + map(tokenize) + map(pack) +
  torch DataLoader, for one pass over the same file;
* resume cost at 1k, 100k and 1M sequences: a fresh shardtune loader's load_state_dict + first
  step, on the prepared data (later positions are later epochs) and on a corpus holding 1M+
  sequences in one epoch; Hugging Face's replay (accelerate's ``skip_first_batches``, what
  ``Trainer`` does) and ``IterableDataset.load_state_dict``, measured at the positions given
  by ``--hf-positions`` (on the file repeated until it holds them) and extrapolated linearly
  beyond, clearly labelled.

    .venv/bin/python bench/data.py            # full run (~5-8 min on one core)
    .venv/bin/python bench/data.py --quick    # smoke check (~1 min, numbers meaningless)

Results: bench/results/data-cpu.json and bench/results/data-cpu.md (``-quick`` for --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / ".cache" / "bench-data"
SINGLE_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS")


def pin_to_one_core(core: int | None) -> int:
    """Pin before numpy/torch/pyarrow start their thread pools: threads inherit the affinity."""
    allowed = sorted(os.sched_getaffinity(0))
    core = allowed[-1] if core is None else core
    if core not in allowed:
        raise SystemExit(f"--core {core} is not among this process's CPUs {allowed}")
    os.sched_setaffinity(0, {core})
    for name in SINGLE_THREAD_ENV:
        os.environ[name] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return core


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=20_000, help="chat records in the generated JSONL")
    p.add_argument("--seq-len", type=int, default=256, help="packed sequence length (the config default)")
    p.add_argument("--batch", type=int, default=8, help="micro-batch = global batch, one rank")
    p.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary (tokenizer.vocab_size default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="runs of each throughput row (median)")
    p.add_argument("--positions", default="1000,100000,1000000", help="resume positions in sequences")
    p.add_argument("--hf-positions", default="1000,100000",
                   help="positions Hugging Face is measured at; larger ones are extrapolated")
    p.add_argument("--core", type=int, default=None, help="CPU to pin to (default: the last allowed)")
    p.add_argument("--quick", action="store_true",
                   help="3k records, positions up to 100k, HF at 1k/5k: a smoke check")
    args = p.parse_args(argv)
    if args.quick:
        args.records, args.repeats = 3_000, 1
        args.positions, args.hf_positions = "1000,10000,100000", "1000,5000"
    args.positions = [int(x) for x in args.positions.split(",")]
    args.hf_positions = [int(x) for x in args.hf_positions.split(",")]
    return args


# --------------------------------------------------------------------------------------
# Measuring


def cpu_seconds() -> float:
    import resource

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class Timed:
    """Wall and CPU seconds of a block, and the share of the machine other processes used."""

    def __enter__(self):
        from throughput_machine import LoadMeter

        self.meter = LoadMeter().__enter__()
        self.cpu0 = cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.meter.__exit__(*exc)
        self.wall, self.cpu = self.meter.wall, cpu_seconds() - self.cpu0
        self.foreign = self.meter.foreign_frac
        return False


def throughput_row(name: str, kind: str, runs: list[tuple[Timed, int, int]]) -> dict:
    """Median over runs of (timing, sequences, tokens)."""
    tokens = runs[0][2]
    wall = statistics.median(t.wall for t, _, _ in runs)
    cpu = statistics.median(t.cpu for t, _, _ in runs)
    return {
        "pipeline": name, "kind": kind, "runs": len(runs), "sequences": runs[0][1], "tokens": tokens,
        "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
        "tokens_per_s": round(tokens / wall), "cpu_tokens_per_s": round(tokens / max(cpu, 1e-9)),
        "foreign_cpu_share": round(statistics.median(t.foreign for t, _, _ in runs), 3),
    }


def extrapolate(points: list[tuple[int, float]], position: int) -> float:
    """Linear through the two largest measured positions (replay cost is work per sequence).

    A non-positive slope is measurement noise around a flat cost: then the larger value stands.
    """
    (x0, y0), (x1, y1) = sorted(points)[-2:]
    return y1 + max(0.0, (y1 - y0) / (x1 - x0)) * (position - x1)


def shardtune_has_workers() -> bool:
    from shardtune.config import DataSection

    return "num_workers" in DataSection.model_fields


def shardtune_has_packing() -> bool:
    from shardtune.config import DataSection

    return "packing" in DataSection.model_fields


def machine_facts(core: int) -> dict:
    import importlib.metadata as md

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    versions = {}
    for pkg in ("torch", "datasets", "transformers", "tokenizers", "pyarrow", "numpy", "accelerate"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True)
    return {
        "cpu": model, "cores_on_machine": os.cpu_count(), "pinned_core": core, "threads": 1,
        "python": platform.python_version(), "platform": platform.platform(), "versions": versions,
        "shardtune_commit": commit.stdout.strip() + (" (+ uncommitted changes)" if dirty.stdout.strip() else ""),
    }


# --------------------------------------------------------------------------------------
# The benchmark


def run(args) -> dict:
    import torch

    torch.set_num_threads(1)
    import accelerate.data_loader  # noqa: F401  (imports out of the timed blocks)
    import data_pipelines as dp
    import datasets
    import pyarrow

    pyarrow.set_cpu_count(1)
    pyarrow.set_io_thread_count(1)
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()

    WORK.mkdir(parents=True, exist_ok=True)
    jsonl, prepared = WORK / "chat.jsonl", WORK / "prepared"
    out: dict = {"config": {k: v for k, v in vars(args).items() if k != "core"}}

    say(f"generating {args.records} chat records")
    records = dp.chat_records(args.records, args.seed)
    size = dp.write_jsonl(records, jsonl)
    with Timed() as t:
        tokenizer = dp.build_tokenizer(records, args.vocab, WORK / "tokenizer")
    out["data"] = {"records": len(records), "jsonl_bytes": size, "format": "chat (2-8 user/assistant turns)",
                   "tokenizer": f"byte-level BPE, {len(tokenizer)} tokens, trained on the data",
                   "tokenizer_train_s": round(t.wall, 2)}

    # a) preparation
    say("shardtune data prepare (end to end)")
    with Timed() as t:
        _, manifest = dp.prepare(jsonl, prepared, tokenizer)
    prep_tokens = sum(s["tokens"] for s in manifest["splits"].values())
    prep_row = throughput_row("shardtune data prepare, end to end (clean, dedup, split, tokenize, write)",
                              "preparation", [(t, 0, prep_tokens)])
    cached_s = dp.prepare_cached(jsonl, prepared, tokenizer)
    say("tokenize step alone")
    with Timed() as t:
        _, tok_tokens = dp.tokenize_only(records, tokenizer)
    tok_row = throughput_row("shardtune data prepare, tokenize step alone", "preparation", [(t, 0, tok_tokens)])
    out["data"].update({
        "documents_per_split": {s: v["documents"] for s, v in manifest["splits"].items()},
        "tokens_per_split": {s: v["tokens"] for s, v in manifest["splits"].items()},
        "prepare_cached_rerun_s": round(cached_s, 3),
    })

    # b) + c) training-time data path, interleaved so both see the same machine state
    source, open_s = dp.open_source(prepared, args.seq_len, args.seed)
    variants = [("concat", w) for w in ([0, 2] if shardtune_has_workers() else [0])]
    if shardtune_has_packing():
        variants.append(("whole_documents", 0))
    st_runs: dict[tuple, list] = {v: [] for v in variants}
    hf_runs: list = []
    for rep in range(args.repeats):
        for packing, w in variants:
            say(f"shardtune loader, {packing} packing, {w} workers ({rep + 1}/{args.repeats})")
            with Timed() as t:
                seqs, tokens = dp.shardtune_epoch(dp.with_packing(source, packing), args.batch, w)
            st_runs[packing, w].append((t, seqs, tokens))
        if rep < max(1, args.repeats - 1):  # one run less: a pass costs ~20x a shardtune epoch
            say(f"HF datasets streaming tokenize+pack ({rep + 1})")
            with Timed() as t:
                seqs, tokens = dp.hf_epoch(jsonl, tokenizer, args.seq_len, args.batch)
            hf_runs.append((t, seqs, tokens))
    hf_row = throughput_row("HF datasets streaming: json -> map(tokenize) -> map(pack) -> DataLoader, 0 workers",
                            "training-time", hf_runs)
    rows = [prep_row, tok_row]
    rows += [throughput_row(f"shardtune GlobalBatchLoader over PreparedSource (mmap), {p} packing, {w} workers",
                            "training-time", st_runs[p, w]) for p, w in variants]
    st0 = rows[2]
    # A single-epoch run pays preparation once plus one pass of the loader per token.
    def combined(key: str) -> int:
        return round(1.0 / (1.0 / prep_row[key] + 1.0 / st0[key]))

    rows.append({"pipeline": "shardtune prepare + 1 epoch of loading (derived from the rows above)",
                 "kind": "derived", "tokens_per_s": combined("tokens_per_s"),
                 "cpu_tokens_per_s": combined("cpu_tokens_per_s")})
    rows.append(hf_row)
    for r in rows:
        r["ratio_vs_hf"] = round(r["tokens_per_s"] / hf_row["tokens_per_s"], 2)
        if "cpu_tokens_per_s" in r:
            r["cpu_ratio_vs_hf"] = round(r["cpu_tokens_per_s"] / hf_row["cpu_tokens_per_s"], 2)
    out["throughput"] = rows
    out["data"]["prepared_source_open_s"] = round(open_s, 4)

    out["resume"] = resume_costs(args, dp, source, tokenizer, records)
    return out


def resume_costs(args, dp, source, tokenizer, records) -> list[dict]:
    from shardtune.data.corpus import InMemorySource

    rows = []

    def shardtune_rows(name: str, make_source, note: str, check=None):
        for p in args.positions:
            say(f"shardtune resume at {p}: {name}")
            runs = [dp.shardtune_resume(make_source, args.batch, p)]
            if runs[0]["cpu_s"] < 1.0:  # cheap ones: median of three
                runs += [dp.shardtune_resume(make_source, args.batch, p) for _ in range(2)]
            row = {"pipeline": name, "method": "load_state_dict + first step", "position": p,
                   "seconds": statistics.median(r["seconds"] for r in runs),
                   "cpu_s": statistics.median(r["cpu_s"] for r in runs), "runs": len(runs), "measured": True,
                   "state": runs[0]["state"], "note": note.format(epoch=runs[0]["epoch_sequences"])}
            if check is not None and p == min(args.positions):
                row["exact"] = check(p, runs[0]["first"])
            rows.append(row)

    shardtune_rows("shardtune, prepared data, concat packing", lambda: source,
                   "{epoch} sequences per epoch: later positions are later epochs",
                   lambda p, first: dp.shardtune_replay_check(source, args.batch, p, first))

    corpus = source.corpus
    big = dp.large_corpus(corpus.doc_lengths, corpus.prompt_lengths, max(args.positions) + 64,
                          args.seq_len, args.seed, WORK)
    note = (f"one epoch of {{epoch}} sequences: {big.num_documents} documents, {big.num_tokens} tokens "
            "memory-mapped (lengths resampled from the prepared data)")
    packings = ["concat", "whole_documents"] if shardtune_has_packing() else ["concat"]
    for packing in packings:
        shardtune_rows(f"shardtune, 1-epoch corpus, {packing} packing",
                       lambda packing=packing: dp.with_packing(InMemorySource(big, args.seq_len, args.seed), packing),
                       note)

    hf_file = WORK / "chat-repeated.jsonl"
    tokens_per_record = float(corpus.doc_lengths.mean())
    need = (max(args.hf_positions) + 4 * args.batch) * args.seq_len * 1.1
    repeat = int(need / (tokens_per_record * len(records))) + 1
    dp.write_jsonl(records, hf_file, repeat=repeat)
    note = f"the JSONL repeated {repeat}x ({repeat * len(records)} records): every position lies in one pass"
    replay = "replay: skip_first_batches (Trainer)"
    state = "IterableDataset.load_state_dict"
    measured: dict[str, list] = {replay: [], state: []}
    for p in args.hf_positions:
        say(f"HF resume at {p}: replay (skip_first_batches) and state_dict")
        r = dp.hf_resume(hf_file, tokenizer, args.seq_len, args.batch, p)
        measured[replay].append((p, r["replay_s"], r["replay_cpu_s"]))
        measured[state].append((p, r["state_dict_s"], r["state_dict_cpu_s"]))
        rows.append({"pipeline": "HF datasets streaming", "method": replay, "position": p,
                     "seconds": r["replay_s"], "cpu_s": r["replay_cpu_s"], "measured": True, "note": note})
        rows.append({"pipeline": "HF datasets streaming", "method": state, "position": p,
                     "seconds": r["state_dict_s"], "cpu_s": r["state_dict_cpu_s"], "measured": True,
                     "exact": r["state_dict_exact"], "state_bytes": r["state_bytes"],
                     "note": note + "; state taken one batch after the replay position"})
    hf_file.unlink()  # ~100 MB, and the sparse token file: only this run needs them
    (WORK / dp.LARGE_TOKENS).unlink()
    if len(args.hf_positions) >= 2:
        src = f"extrapolated linearly from the measured {args.hf_positions[-2]} and {args.hf_positions[-1]}"
        for p in args.positions:
            if p <= max(args.hf_positions):
                continue
            for method, pts in measured.items():
                rows.append({"pipeline": "HF datasets streaming", "method": method, "position": p,
                             "seconds": extrapolate([(x, w) for x, w, _ in pts], p),
                             "cpu_s": extrapolate([(x, c) for x, _, c in pts], p), "measured": False, "note": src})
    for r in rows:
        r["seconds"], r["cpu_s"] = round(r["seconds"], 5), round(r["cpu_s"], 5)
    return rows


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    core = pin_to_one_core(args.core)
    sys.path.insert(0, str(ROOT / "bench"))
    from data_report import markdown, table

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    results = run(args)
    results["machine"] = machine_facts(core)
    results["load"] = {"loadavg_1_5_15_before": [round(x, 2) for x in load_before],
                       "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
                       "note": "machine shared with other jobs; foreign_cpu_share per row is the share of "
                               "all cores other processes used while the row ran"}
    results["total_s"] = round(time.perf_counter() - t0, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "data-cpu-quick" if args.quick else "data-cpu"
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(results))
    print(table(results))
    print(f"\nwrote {RESULTS / stem}.json and .md in {results['total_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
