"""Under torchrun: build a run, take one optimizer step (so the optimizer holds its moments),
then print this rank's largest live tensor bytes seen after each backward of the second
step: weights, gradients (accumulated or partitioned), optimizer moments, communication
buffers. Activations are freed by then, so they are not counted."""

import gc
import json
import sys

import torch.distributed

from shardtune.config import load_config
from shardtune.distributed.process_group import init_distributed, shutdown
from shardtune.plan import live_tensor_bytes
from shardtune.tasks import CausalLMTask
from shardtune.train.components import build_run

cfg = load_config(sys.argv[1], sys.argv[2:])
ctx = init_distributed(300, 300)
parts = build_run(cfg, ctx)
strategy = parts.strategy
peak = 0
for step in range(2):
    batches = parts.loader.next_step()
    for i, batch in enumerate(batches):
        is_last = i == len(batches) - 1
        with strategy.micro_step(is_last):
            strategy.backward(CausalLMTask().loss_sum(strategy.model, batch, ctx.device) * 1e-3, is_last)
        if step == 1:
            # Gradients made by autograd have no Python object until touched; gc sees only those.
            grads = [p.grad for p in strategy.unwrapped.parameters()]
            gc.collect()
            peak = max(peak, live_tensor_bytes())
            del grads
    strategy.step(1.0, skip=False)
# One line from rank 0: two ranks writing to one pipe can interleave their lines.
rows = [None] * ctx.world_size
torch.distributed.all_gather_object(rows, {"rank": ctx.rank, "bytes": peak, "params": parts.num_params})
if ctx.is_main:
    for row in rows:
        print(json.dumps(row), flush=True)
shutdown()
