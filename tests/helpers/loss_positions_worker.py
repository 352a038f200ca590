"""Under torchrun (2 ranks): for each strategy named on the command line, one backward with the
full-logits loss and one with the loss-position-only head, from identical weights (tied
embeddings, label smoothing) and a different batch per rank. Rank 0 prints one JSON line per
strategy: the largest loss and gradient differences, relative to each tensor's scale."""

import json
import sys

import torch

from shardtune.config import load_config
from shardtune.data.packing import IGNORE_INDEX
from shardtune.distributed.process_group import init_distributed, shutdown
from shardtune.distributed.strategies import build_strategy
from shardtune.models.loading import build_model
from shardtune.tasks import CausalLMTask, selective_head

VOCAB = 211


class Tok:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __len__(self):
        return VOCAB


def packed_batch(seed: int, rows: int = 2, seq_len: int = 48):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (rows, seq_len), generator=g)
    position_ids = torch.cat([torch.arange(20), torch.arange(seq_len - 20)]).repeat(rows, 1)
    labels = input_ids.clone()
    labels[torch.rand(rows, seq_len, generator=g) > 0.3] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def full_grads(strategy) -> dict[str, torch.Tensor]:
    params = dict(strategy.unwrapped.named_parameters())
    if strategy.name.startswith("zero"):
        from deepspeed.utils import safe_get_full_grad

        return {n: safe_get_full_grad(p).detach().clone() for n, p in params.items()}
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
            for n, p in params.items()}


def one_backward(config: str, strategy_name: str, ctx, selective: bool):
    cfg = load_config(config, [f"distributed.strategy={strategy_name}", "train.global_batch_size=4",
                               "model.config.tie_word_embeddings=true"])
    torch.manual_seed(0)
    model = build_model(cfg.model, Tok())
    strategy = build_strategy(cfg, ctx)
    strategy.setup(model, total_steps=4)
    task = CausalLMTask(label_smoothing=0.1, selective=selective)
    if selective:
        assert selective_head(strategy.model) is not None, strategy_name
    with strategy.micro_step(True):
        with strategy.autocast():
            loss = task.loss_sum(strategy.model, packed_batch(seed=100 + ctx.rank), ctx.device)
        strategy.backward(loss * 0.01, True)
    return loss.detach(), full_grads(strategy)


def main() -> None:
    config, *strategies = sys.argv[1:]
    ctx = init_distributed(300, 300)
    for name in strategies:
        ref_loss, ref = one_backward(config, name, ctx, selective=False)
        loss, got = one_backward(config, name, ctx, selective=True)
        grad_diff = max(float((got[n] - ref[n]).abs().max()) / max(1.0, float(ref[n].abs().max())) for n in ref)
        row = {"strategy": name, "rank": ctx.rank, "params": sorted(ref) == sorted(got),
               "loss_diff": abs(float(loss - ref_loss)) / max(1.0, abs(float(ref_loss))),
               "grad_diff": grad_diff, "tied": "lm_head.weight" not in ref,
               "grad_norm": sum(float(g.double().pow(2).sum()) for g in ref.values()) ** 0.5}
        rows = [None] * ctx.world_size
        torch.distributed.all_gather_object(rows, row)
        if ctx.is_main:
            print(json.dumps(rows), flush=True)
    shutdown()


if __name__ == "__main__":
    main()
