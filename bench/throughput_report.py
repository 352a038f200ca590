"""Tables of the throughput benchmark: medians, ratios to HF Trainer, MFU, targets."""

from __future__ import annotations

import statistics
from dataclasses import asdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from throughput_jobs import Measurement

# --------------------------------------------------------------------------------------
# Report


def _median(values):
    return statistics.median(values) if values else None


def analyse(measurements: list[Measurement], facts: dict, peaks: dict) -> tuple[list[dict], dict]:
    rows = []
    for m in measurements:
        ok = [r for r in m.repeats if r.get("rc") == 0]
        if any(not r.get("superseded_noisy") for r in ok):
            ok = [r for r in ok if not r.get("superseded_noisy")]
        # Every steady-state window of every run is one sample: the median shrugs off a burst
        # of load from other processes inside one window.
        rates = [w for r in ok for w in r["window_tokens_per_s"]]
        f = facts[m.job.model]
        peak = peaks[m.job.layout]
        med = _median(rates)
        row = {
            **asdict(m.job), "id": m.job.id, "layout": m.job.layout,
            "tokens_per_s_median": med,
            "tokens_per_s_min": min(rates) if rates else None,
            "tokens_per_s_max": max(rates) if rates else None,
            "n_windows": len(rates), "n_ok": len(ok),
            "n_runs": len([r for r in m.repeats if not r.get("superseded_noisy")]),
            "run_tokens_per_s": [round(r["tokens_per_s"], 1) for r in ok],
            "peak_flops": peak,
            "matmul_bound_tokens_per_s": peak / f["flops_per_token"],
            "mfu": f["flops_per_token"] * med / peak if med else None,
            "foreign_cpu_frac_max": max((r["foreign_cpu_frac"] for r in ok), default=None),
            "shardtune_reported_mfu": _median([r["shardtune_reported_mfu"] for r in ok if r.get("shardtune_reported_mfu")]),
            "repeats": m.repeats,
        }
        rows.append(row)

    index = {(r["model"], r["impl"], r["strategy"], r["layout"]): r for r in rows}

    def rate(model, impl, strategy, layout):
        r = index.get((model, impl, strategy, layout))
        return r["tokens_per_s_median"] if r else None

    for r in rows:  # vs HF Trainer at the same layout
        hf = rate(r["model"], "hf", "ddp", r["layout"])
        r["vs_hf"] = r["tokens_per_s_median"] / hf if (hf and r["tokens_per_s_median"]) else None

    scaling = []
    for (model, impl, strategy, layout), r in index.items():
        if layout != "2p1t":
            continue
        one = rate(model, impl, strategy, "1p1t")
        two = r["tokens_per_s_median"]
        if one and two:
            scaling.append({"model": model, "impl": impl, "strategy": strategy,
                            "tokens_per_s_1p1t": one, "tokens_per_s_2p1t": two, "efficiency": two / (2 * one)})

    targets = {}
    big = "llama21m" if "llama21m" in facts else next(iter(facts))
    for layout in ("1p2t", "2p1t"):
        st, hf = rate(big, "shardtune", "ddp", layout), rate(big, "hf", "ddp", layout)
        if st and hf:
            targets[f"vs_hf_ddp_{layout}"] = {"model": big, "value": st / hf, "target": 1.1, "met": st / hf >= 1.1}
        r = index.get((big, "shardtune", "ddp", layout))
        if r and r["mfu"]:
            targets[f"matmul_bound_ddp_{layout}"] = {"model": big, "value": r["mfu"], "target": 0.75,
                                                     "met": r["mfu"] >= 0.75}
    best = max((r for r in rows if r["model"] == big and r["impl"] == "shardtune" and r["mfu"]),
               key=lambda r: r["mfu"], default=None)
    if best:
        targets["matmul_bound_best_shardtune"] = {"model": big, "value": best["mfu"], "target": 0.75,
                                                  "met": best["mfu"] >= 0.75, "job": best["id"]}
    for s in scaling:
        if s["model"] == big and s["impl"] == "shardtune" and s["strategy"] == "ddp":
            targets["scaling_ddp_1to2"] = {"model": big, "value": s["efficiency"], "target": 0.85,
                                           "met": s["efficiency"] >= 0.85}
    ratios = {f"{r['model']}/{r['impl']}/{r['strategy']}/{r['layout']}": r["vs_hf"]
              for r in rows if r["impl"] != "hf" and r["vs_hf"] is not None}
    return rows, {"ratios_vs_hf": ratios, "scaling": scaling, "targets": targets}


def _fmt(x, spec=",.0f", none="—"):
    return none if x is None else format(x, spec)


def markdown(result: dict) -> str:
    meta, facts, peaks = result["meta"], result["models"], result["matmul"]["peak_flops"]
    lines = [
        f"# CPU training throughput ({meta['mode']} mode)",
        "",
        f"{meta['cpu']}, {meta['cores']} cores; torch {meta['torch']}, transformers {meta['transformers']}, "
        f"deepspeed {meta['deepspeed']}, accelerate {meta['accelerate']}; {meta['started']}.",
        f"Steady state: {result['plan']['warmup']} warm-up steps dropped, then {result['plan']['measured']} steps "
        f"timed in windows of {result['plan']['window']} steps; each row is the median over the windows of all its runs. Layout `NpMt` = N ranks x M threads each.",
        "",
        "fp32 matmul peak (1024x1024, best sample): "
        + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()),
        "",
        "| model | params | FLOP/token | seq | micro/global batch |",
        "|---|---:|---:|---:|---:|",
    ]
    for f in facts.values():
        lines.append(f"| {f['label']} | {f['params'] / 1e6:.2f}M | {f['flops_per_token'] / 1e6:.1f}M | {f['seq_len']} "
                     f"| {f['micro_batch_size']}/{f['global_batch_size']} |")
    lines += [
        "",
        "| model | impl | strategy | layout | tokens/s (median) | windows/runs | min–max | vs HF | MFU (= of matmul bound) | matmul bound tok/s | other load |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["measurements"]:
        label = facts[r["model"]]["label"]
        impl = "shardtune + train.compile=blocks" if r["impl"] == "shardtune+compile" else (
            "HF Trainer" if r["impl"] == "hf" else "shardtune")
        failed = "" if r["n_ok"] == r["n_runs"] else f" ({r['n_runs'] - r['n_ok']} failed)"
        lines.append(
            f"| {label} | {impl} | {r['strategy']} | {r['layout']} | {_fmt(r['tokens_per_s_median'])}{failed} "
            f"| {r['n_windows']}/{r['n_ok']} | {_fmt(r['tokens_per_s_min'])}–{_fmt(r['tokens_per_s_max'])} | {_fmt(r['vs_hf'], '.2f')} "
            f"| {_fmt(r['mfu'], '.1%')} | {_fmt(r['matmul_bound_tokens_per_s'])} "
            f"| {_fmt(r['foreign_cpu_frac_max'], '.0%')} |"
        )
    lines += ["", "Scaling 1 -> 2 ranks at one thread per rank (tokens/s 2p1t / (2 x tokens/s 1p1t)):", "",
              "| model | impl | strategy | 1p1t | 2p1t | efficiency |", "|---|---|---|---:|---:|---:|"]
    for s in result["scaling"]:
        lines.append(f"| {facts[s['model']]['label']} | {s['impl']} | {s['strategy']} | {s['tokens_per_s_1p1t']:,.0f} "
                     f"| {s['tokens_per_s_2p1t']:,.0f} | {s['efficiency']:.1%} |")
    lines += ["", "Targets (from the issue):", "", "| target | model | value | goal | met |", "|---|---|---:|---:|---|"]
    names = {
        "vs_hf_ddp_1p2t": "shardtune ddp / HF Trainer, 1 process x 2 threads",
        "vs_hf_ddp_2p1t": "shardtune ddp / HF Trainer, 2 processes x 1 thread",
        "matmul_bound_ddp_1p2t": "shardtune ddp, fraction of matmul bound, 1p2t",
        "matmul_bound_ddp_2p1t": "shardtune ddp, fraction of matmul bound, 2p1t",
        "matmul_bound_best_shardtune": "best shardtune row, fraction of matmul bound",
        "scaling_ddp_1to2": "shardtune ddp scaling efficiency 1 -> 2 ranks (1 thread/rank)",
    }
    for key, t in result["targets"].items():
        goal = f"≥{t['target']:.2f}x" if key.startswith("vs_hf") else f"≥{t['target']:.0%}"
        value = f"{t['value']:.2f}x" if key.startswith("vs_hf") else f"{t['value']:.1%}"
        extra = f" ({t['job']})" if "job" in t else ""
        lines.append(f"| {names.get(key, key)}{extra} | {facts[t['model']]['label']} | {value} | {goal} "
                     f"| {'yes' if t['met'] else 'NO'} |")
    over = [r["id"] for r in result["measurements"] if r["mfu"] and r["mfu"] > 1.0]
    if over:
        lines += ["", f"**MFU above 100% in {', '.join(over)}: the matmul peak was measured low (load from other "
                  "processes during every probe round); treat those MFU values as unreliable.**"]
    lines += ["", "HF Trainer reference: same weights (shardtune's build_model, same seed), tokenizer and packed "
              "sequences in the same order (sequential sampler), AdamW with the same hyper-parameters and clipping, "
              "ddp_find_unused_parameters=False, no logging/saving; 2 processes through torchrun (DDP, gloo).",
              "", "'other load' = CPU time used by processes outside the benchmark during the run, as a fraction "
              "of the machine (noise indicator). The +compile rows run "
              "shardtune with train.compile=blocks."]
    return "\n".join(lines) + "\n"

