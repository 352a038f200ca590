"""Build DeepSpeed's JIT-compiled CPU ops once, in one process (``make warm``).

On CPU, DeepSpeed compiles ``deepspeed_shm_comm_op`` at its first initialisation (~40 s).
Two ranks starting together would both compile into the same cache directory.
"""

from __future__ import annotations

import os
import time


def main() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    if torch.cuda.is_available():
        return
    from shardtune.distributed.process_group import init_distributed, shutdown

    start = time.perf_counter()
    init_distributed(init_timeout_s=300, collective_timeout_s=300)
    try:
        import deepspeed

        model = torch.nn.Linear(4, 4)
        optimizer = torch.optim.AdamW(model.parameters())
        deepspeed.initialize(
            model=model, optimizer=optimizer, dist_init_required=False,
            config={"train_batch_size": 1, "zero_optimization": {"stage": 1},
                    "zero_allow_untested_optimizer": True},
        )
    finally:
        shutdown()
    print(f"DeepSpeed CPU ops ready ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
