"""One bench/loading.py measurement under torchrun: tests/helpers/sharded_load_worker.py, with
the safetensors reader chosen by BENCH_READER:

* ``pread`` (what shardtune ships): each rank ``pread``s its own byte ranges, nothing mapped.
* ``safe_open``: ``safetensors.safe_open(...).get_slice(key)[rows]`` per tensor, the file
  handles (memory maps) kept open for the whole load, as a reader holding them would.
* ``dcp``: ``torch.distributed.checkpoint.load`` with ``HuggingFaceStorageReader`` (fsdp only:
  it fills DTensors; it reads through ``safe_open`` slices itself).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "helpers"))

from shardtune.models import sharded_load  # noqa: E402


def use_safe_open() -> None:
    from safetensors import safe_open

    handles = {}

    def read_flat(self, key: str, start: int, out: torch.Tensor) -> None:
        stored = self.tensors[key]
        if stored.path not in handles:
            handles[stored.path] = safe_open(str(stored.path), "pt")
        row = math.prod(stored.shape[1:]) if len(stored.shape) > 1 else 1
        first, last = start // row, -(-(start + out.numel()) // row)
        piece = handles[stored.path].get_slice(key)[first:last].reshape(-1)
        offset = start - first * row
        out.copy_(piece[offset:offset + out.numel()].view(out.shape))

    sharded_load.SafetensorsCheckpoint.read_flat = read_flat


def use_dcp() -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    original = sharded_load.ModelWeights.load_into

    def load_into(self, target, local_view) -> None:
        tensors = dict(sharded_load.tensor_names(target))
        state = {key: tensors[name].detach() for name, key in self.keys.items()}
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(self.checkpoint.directory)))
        keys, self.keys = self.keys, {}
        try:
            original(self, target, local_view)  # the initialised tensors (rotary buffers)
        finally:
            self.keys = keys

    sharded_load.ModelWeights.load_into = load_into


if __name__ == "__main__":
    reader = os.environ.get("BENCH_READER", "pread")
    if reader == "safe_open":
        use_safe_open()
    elif reader == "dcp":
        use_dcp()
    import sharded_load_worker

    sharded_load_worker.main(sys.argv[1:])
