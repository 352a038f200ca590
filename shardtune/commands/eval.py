"""``shardtune eval CHECKPOINT_OR_HF_DIR --split test``: evaluate a trained model in one process."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a checkpoint or Hugging Face directory on a split",
        description="shardtune eval CHECKPOINT_OR_HF_DIR [CONFIG] [key=value ...] --split test: one "
        "process; the data comes from the config (default: the run config stored in the checkpoint).",
    )
    p.add_argument("path", help="a checkpoint (step-N or a checkpoints dir: latest) or an HF model dir")
    p.add_argument("config", nargs="?", default=None, help="run config (default: the checkpoint's own)")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--json", dest="json_out", help="also write the metrics to this JSON file")


def run(args, extra, parser) -> int:
    from shardtune.checkpoint.export import export_hf
    from shardtune.checkpoint.manifest import resolve_checkpoint
    from shardtune.checkpoint.safe_io import check_checkpoint
    from shardtune.eval.standalone import config_for, evaluate_model_dir

    path = Path(args.path)
    overrides = [*args.overrides, *extra]
    is_hf = (path / "config.json").is_file()
    checkpoint = None if is_hf else resolve_checkpoint(path)
    if checkpoint is not None:  # before its trainer state is read for the config
        check_checkpoint(checkpoint, checksums=True)
    cfg = config_for(checkpoint or path, args.config, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        if checkpoint is not None:
            model_dir = export_hf(checkpoint, Path(tmp) / "hf", adapters_only=False)
        else:
            model_dir = path
        metrics = evaluate_model_dir(model_dir, cfg, args.split)
    shown = {k: v for k, v in metrics.items() if k != "confusion"}
    print(f"{args.split} split of {cfg.task} data, model {checkpoint or path}:")
    for key, value in shown.items():
        print(f"  {key:<24} {value:.4f}")
    if "confusion" in metrics:
        print(f"  confusion (rows: true)   {metrics['confusion']}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(metrics, indent=1))
    return 0
