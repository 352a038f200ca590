#!/usr/bin/env python
"""How far bench/sft.py's ratios can go at equal arithmetic speed.

A ratio of loss tokens per second is a ratio of loss tokens per FLOP when both sides run their
FLOPs equally fast. From each row's measured per-step counts and the model's shapes this
computes two ceilings on shardtune whole_documents' ratio over HF and TRL:

* ``weights``: the matrix products with the weights only (fwd + bwd = 6 FLOPs per parameter per
  position). shardtune scores the LM head on loss positions only; HF and TRL on every position
  (padding included for HF).
* ``attention_free``: as ``weights``, plus the other side's attention as the dense, masked
  product SDPA runs over its rows (12 FLOPs per layer per position per key per attention channel,
  fwd + bwd), while shardtune's attention is counted as costing nothing. No attention kernel
  can beat that, so no shardtune that runs the same model at the other side's FLOP rate can.

A measured ratio above a ceiling means the other side spends time outside those FLOPs (TRL
scores entropy and token accuracy every step; both frameworks have per-step overheads). Below
the attention-free ceiling is where shardtune's own attention and overheads cost.

    .venv/bin/python bench/sft_flops.py bench/results/sft-cpu.json   # adds the ceilings to .json/.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from shardtune.plan import Architecture


def model_shapes(model_dir: Path) -> dict:
    arch = Architecture.from_mapping(json.loads((Path(model_dir) / "config.json").read_text()))
    return {"trunk_parameters": arch.layers * arch.block_params, "head_parameters": arch.vocab * arch.hidden,
            "layers": arch.layers, "attention_width": arch.hidden}


def _context(row: dict, world_size: int) -> float:
    """Keys each query sees in the other side's dense attention: its row (or padded batch) length."""
    step, config = row["per_step"], row["config"]
    if row["contender"] == "trl":  # padding-free: a rank's packed sequences form its rows
        return step["positions"] / (world_size * config["packed_sequences_per_rank"])
    return step["positions"] / step["records"]  # HF pads each batch to its longest record


def _flops_per_step(row: dict, shapes: dict, world_size: int, *, head_on_loss_only: bool, attention: bool) -> float:
    step = row["per_step"]
    head_positions = step["loss_tokens"] if head_on_loss_only else step["positions"]
    flops = 6 * shapes["trunk_parameters"] * step["positions"] + 6 * shapes["head_parameters"] * head_positions
    if attention:
        flops += 12 * shapes["layers"] * shapes["attention_width"] * _context(row, world_size) * step["positions"]
    return flops


def ceilings(result: dict) -> dict:
    """Per ratio key: the measured ratio and both ceilings (see the module docstring)."""
    shapes = model_shapes(result["plan"]["model_dir"])
    world = result["plan"]["world_size"]
    rows = {(r["dataset"], r["contender"]): r for r in result["rows"]}
    out = {}
    for key, measured in result["ratios"].items():
        dataset, _, other = key.partition("_vs_")
        ours, theirs = rows[(dataset, "shardtune-whole")], rows[(dataset, other)]
        ours_per_flop = ours["per_step"]["loss_tokens"] / _flops_per_step(
            ours, shapes, world, head_on_loss_only=True, attention=False)
        weights = ours_per_flop / (theirs["per_step"]["loss_tokens"] / _flops_per_step(
            theirs, shapes, world, head_on_loss_only=False, attention=False))
        attention_free = ours_per_flop / (theirs["per_step"]["loss_tokens"] / _flops_per_step(
            theirs, shapes, world, head_on_loss_only=False, attention=True))
        out[key] = {"measured": measured, "weights": weights, "attention_free": attention_free,
                    "their_attention_context": _context(theirs, world)}
    return {"shapes": shapes, "ratios": out}


def markdown(bounds: dict, targets: dict) -> str:
    s = bounds["shapes"]
    lines = ["## The ceiling at equal arithmetic (bench/sft_flops.py)", "",
             f"From each row's measured positions and loss tokens per step and the model's shapes "
             f"({s['trunk_parameters'] / 1e6:.1f}M parameters in the layers, {s['head_parameters'] / 1e6:.1f}M in the "
             "LM head): the largest ratio possible if every contender ran its FLOPs equally fast (a measured "
             "ratio above it: the other side loses time outside those FLOPs). "
             "*weights*: the weight products only (shardtune's head on loss positions, theirs on every position). "
             "*attention free*: also their dense attention over their rows, with shardtune's attention costing nothing.",
             "", "| ratio | measured | ceiling: weights | ceiling: attention free | their keys per query | target |",
             "|---|---|---|---|---|---|"]
    for key, b in bounds["ratios"].items():
        target = f">= {targets[key]}x" if key in targets else "-"
        lines.append(f"| {key} | {b['measured']:.2f}x | {b['weights']:.2f}x | {b['attention_free']:.2f}x "
                     f"| {b['their_attention_context']:.0f} | {target} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    path = Path(argv[0])
    result = json.loads(path.read_text())
    result["arithmetic_ceilings"] = ceilings(result)
    path.write_text(json.dumps(result, indent=1) + "\n")
    md = path.with_suffix(".md")
    text = md.read_text().split("\n## The ceiling at equal arithmetic")[0].rstrip("\n") + "\n"
    md.write_text(text + "\n" + markdown(result["arithmetic_ceilings"], result["targets"]))
    print(markdown(result["arithmetic_ceilings"], result["targets"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
