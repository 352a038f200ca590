"""Rank-zero metrics: TensorBoard scalars, a JSONL file, the progress bar, FLOP accounting.

Only rank 0 constructs a writer; other ranks get a logger whose calls do nothing, so the
loop has no ``if rank == 0`` branches.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

from shardtune.eval.trackers import ExternalTrackers, check_installed

# Dense bf16 peak per GPU (FLOP/s) for MFU on known accelerators.
_GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def flops_per_token(model_config, num_params: int, seq_len: int, trainable_params: int | None = None,
                    forward_only_layers: int = 0) -> float:
    """Training FLOPs per token: the weight matmuls plus the attention score/value matmuls.

    A trained weight costs 6 FLOPs per token (forward, input gradient, weight gradient); a frozen
    one 4 when gradients still flow through it to trained weights below (LoRA), 2 in the bottom
    ``forward_only_layers`` that no gradient reaches (a frozen base under a task head). Counting
    a LoRA run's frozen base at 6 made its MFU exceed 1. The input embedding is a lookup, not a
    matmul, so its parameters are excluded; with tied embeddings the one shared matrix is also
    the output projection.
    """
    hidden = getattr(model_config, "hidden_size", 0)
    layers = getattr(model_config, "num_hidden_layers", 0)
    vocab = getattr(model_config, "vocab_size", 0)
    tied = getattr(model_config, "tie_word_embeddings", False)
    lookup = 0 if tied else vocab * hidden
    dense = num_params - lookup
    frozen = 0 if trainable_params is None else num_params - trainable_params
    # An untied lookup table that is frozen is part of ``frozen`` but no matmul either.
    frozen_dense = max(0, min(dense, frozen - (lookup if frozen >= lookup else 0)))
    frozen_cost = 2.0 if forward_only_layers else 4.0
    forward_only = min(max(forward_only_layers, 0), layers)
    attention = (12.0 * (layers - forward_only) + 4.0 * forward_only) * hidden * seq_len
    return 6.0 * (dense - frozen_dense) + frozen_cost * frozen_dense + attention


def head_flops_per_position(model_config, trained: bool) -> float:
    """The output projection's share of ``flops_per_token``: 6 FLOPs per weight when it trains,
    4 when frozen (only the input gradient flows back through it)."""
    return (6.0 if trained else 4.0) * getattr(model_config, "vocab_size", 0) * getattr(model_config, "hidden_size", 0)


def measure_cpu_matmul_flops(samples: int = 5, seconds: float = 0.15, size: int = 1024) -> float:
    """This process's fp32 matmul rate with its current thread count (FLOP/s).

    The best of several short samples: a single sample taken while anything else runs
    understates the peak and makes the logged MFU exceed 1.
    """
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = 0.0
    for _ in range(samples):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
        best = max(best, 2.0 * size**3 * count / (time.perf_counter() - start))
    return best


def peak_flops_per_rank(device: torch.device, override_tflops: float | None) -> float:
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in _GPU_PEAK_BF16.items():
            if key in name:
                return peak
        return 0.0
    # Measured concurrently on every rank so each sees the contention it will train under.
    return measure_cpu_matmul_flops()


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsLogger:
    def __init__(
        self, log_dir: Path, enabled: bool, trackers: list[str], progress: bool, total_steps: int,
        run_name: str = "run", config: dict | None = None,
    ):
        self.enabled = enabled
        self.log_dir = log_dir
        self.writer = None
        self.jsonl = None
        self.bar = None
        self.external = None  # W&B / MLflow (eval/trackers.py)
        check_installed(trackers)  # on every rank: a missing extra stops them all alike, at once
        if not enabled:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        if {"wandb", "mlflow"} & set(trackers):
            self.external = ExternalTrackers(trackers, log_dir, run_name, config or {})
        if "tensorboard" in trackers:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir / "tensorboard"))
        self.jsonl = (log_dir / "metrics.jsonl").open("a")
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total_steps, desc="train", unit="step", dynamic_ncols=True
            )

    def start_at(self, step: int) -> None:
        """A resumed run's progress bar starts where the checkpoint left off."""
        if self.bar is not None:
            self.bar.initial = self.bar.n = step
            self.bar.refresh()
        if self.external is not None:
            self.external.start(resumed=step > 0)

    @property
    def tensorboard_dir(self) -> Path:
        return self.log_dir / "tensorboard"

    def log(self, step: int, scalars: dict[str, float], kind: str = "train", extra: dict | None = None) -> None:
        """Scalars go to TensorBoard as ``kind/key`` and to metrics.jsonl; ``extra`` (lists,
        e.g. a confusion matrix) to metrics.jsonl only."""
        if not self.enabled:
            return
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(f"{kind}/{key}", value, step)
        self.jsonl.write(json.dumps({"kind": kind, "step": step, **scalars, **(extra or {})}) + "\n")
        self.jsonl.flush()
        if self.external is not None:
            self.external.log(step, {f"{kind}/{key}": value for key, value in scalars.items()})

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_text(tag, text, step)

    def advance(self, steps: int, postfix: dict[str, float] | None = None) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self, result: dict | None = None) -> None:
        """``result``: the finished run's result.json, recorded by the external trackers (a close
        without it, after a failure, marks their runs failed). A second close changes nothing."""
        if self.external is not None:
            external, self.external = self.external, None
            external.finish(result)
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
