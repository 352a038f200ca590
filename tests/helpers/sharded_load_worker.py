"""Under torchrun: load a model the way ``build_run`` does (``strategy.build_model``, the
fine-tuning plan, ``strategy.setup``), measuring this rank's resident memory during the load,
then compare its logits on fixed tokens with a full ``build_model`` under the same seed
(``from_pretrained`` for a checkpoint, ``from_config`` for a config).

    torchrun --nproc-per-node 2 sharded_load_worker.py OUT.json CASES.json

Several cases run in one process group (one torchrun start-up); a memory measurement
should be a case of its own run, since freed memory stays with the allocator.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


class StandInTokenizer:
    """What model building reads from a tokenizer, for checkpoints that ship none."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.bos_token_id, self.eos_token_id, self.pad_token_id = 1, 2, 0

    def __len__(self) -> int:
        return self.vocab_size


def status_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib() -> float:
    return status_mib("VmRSS")


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()


def warm_imports(cfg, tokenizer, labels) -> None:
    """Import the model's code (and DeepSpeed) before measuring: the load is what is
    measured, not the ~100 MiB of modules a first import maps."""
    from shardtune.models.loading import model_class_and_config

    if cfg.distributed.strategy.startswith("zero"):
        import deepspeed  # noqa: F401
    auto, config, _ = model_class_and_config(cfg.model, tokenizer, task=cfg.task, label_names=labels)
    with torch.device("meta"):
        auto.from_config(config)


def load_case(ctx, config: str, overrides: list[str], labels, reference: bool, full_build: bool) -> dict:
    from shardtune.config import load_config
    from shardtune.distributed.strategies import build_strategy
    from shardtune.distributed.strategies.base import Strategy
    from shardtune.models.loading import build_model
    from shardtune.models.sharded_load import peak_host_memory_mib, reset_peak_host_memory
    from shardtune.train.finetune import apply_finetuning

    cfg = load_config(config, overrides)
    if cfg.model.name_or_path:
        vocab = json.loads((Path(cfg.model.name_or_path) / "config.json").read_text())["vocab_size"]
    else:
        vocab = cfg.model.config.get("vocab_size", cfg.tokenizer.vocab_size)
    tokenizer = StandInTokenizer(vocab)
    strategy = build_strategy(cfg, ctx)
    warm_imports(cfg, tokenizer, labels)
    dist.barrier()
    reset_peak_host_memory()
    before = rss_mib()
    start = time.perf_counter()
    torch.manual_seed(cfg.run.seed)
    # --full-build: the base class's entry, i.e. every rank builds the whole model (the
    # path every strategy took before sharded loading), for the bench's comparison.
    build = Strategy.build_model if full_build else type(strategy).build_model
    model = build(strategy, tokenizer, labels)
    built_peak = peak_host_memory_mib()  # a full build's weights are all in place here
    model, plan = apply_finetuning(model, cfg.finetune, cfg.train.lr)
    strategy.lr_scales = plan.lr_scales
    strategy.setup(model, total_steps=10)
    load_seconds = time.perf_counter() - start
    peak = peak_host_memory_mib()
    dist.barrier()
    # "load": until the weights are in place; "setup": also the optimizer / DeepSpeed engine
    # state that setup allocates (ZeRO-3's fp32 partitions and gradient buffers).
    loaded = strategy.load_peak_host_mib or built_peak
    row = {"rank": ctx.rank, "rss_before_mib": before, "peak_mib": peak, "growth_mib": peak - before,
           "load_growth_mib": loaded - before,
           "load_seconds": load_seconds, "load_seconds_all": time.perf_counter() - start,
           "note": strategy.load_note,
           # After the load: private memory vs mapped file pages (shared page cache).
           "rss_anon_mib": status_mib("RssAnon"), "rss_file_mib": status_mib("RssFile")}
    if reference:
        strategy.train(False)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(3, vocab, (2, 12), generator=generator)
        got = logits_of(strategy.model, ids.to(ctx.device))
        torch.manual_seed(cfg.run.seed)
        full = build_model(cfg.model, tokenizer, task=cfg.task, label_names=labels,
                           dropout=cfg.finetune.dropout).eval()
        want = logits_of(full, ids)
        row["max_abs_diff"] = float((got - want).abs().max())
        row["max_abs_logit"] = float(want.abs().max())
        row["logits_shape"] = list(want.shape)
    rows = [None] * ctx.world_size
    dist.all_gather_object(rows, row)
    return {"config": config, "overrides": overrides, "labels": labels, "rows": rows}


def main(argv: list[str]) -> None:
    """argv: OUT.json CASES.json, where CASES is a list of {"config", "overrides", "labels"
    (a count or null), "reference" (default true), "full_build" (default false)}."""
    from shardtune.distributed.process_group import init_distributed, shutdown

    out, cases = Path(argv[0]), json.loads(Path(argv[1]).read_text())
    ctx = init_distributed(300, 300)
    results = []
    for case in cases:
        labels = [f"label{i}" for i in range(case["labels"])] if case.get("labels") else None
        results.append(load_case(ctx, case["config"], case.get("overrides", []), labels,
                                 case.get("reference", True), case.get("full_build", False)))
    if ctx.is_main:
        out.write_text(json.dumps(results, indent=1))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
