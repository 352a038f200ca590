"""``shardtune plan``: per-rank memory for every strategy, before renting the GPUs.

Bytes per parameter follow what each strategy actually keeps (AdamW: two fp32 moments):

=========  ====================================  ===============================
strategy   bf16 mixed precision (GPU)            fp32 (CPU)
=========  ====================================  ===============================
ddp        fp32 weights 4 + grads 4 + Adam 8     same
fsdp       (4 + 4 + 8) / N + unsharded bf16      (4 + 4 + 8) / N + unsharded
           blocks in flight                      fp32 blocks in flight
zero1      bf16 weights 2 + bf16 grads 2 +       weights 4 + grads 4 + (4+8)/N
           (fp32 master 4 + Adam 8) / N
zero2      2 + 2/N + 12/N                        4 + 4/N + 12/N
zero3      (2 + 2 + 12)/N + live gathered        (4 + 4 + 12)/N + live gathered
=========  ====================================  ===============================

With CPU offload the fp32 master and the moments (the 12/N) move to host memory.

Host memory per rank while the model loads (``host_load_bytes``): ddp, zero1 and zero2 build
the whole fp32 model on the host before moving it (4 bytes per parameter; the safetensors
files are memory-mapped, so a node's ranks share one page-cache copy of the checkpoint).
fsdp and zero3 build on ``meta`` and read only their own shards: on a GPU each shard passes
through a host buffer one tensor at a time (the largest tensor / N); on CPU the shards stay
(4/N per parameter). A model from a config also replays its largest module's initialisation
in full on the host (the embedding). Python, torch and CUDA themselves (~1-3 GiB) are not
counted.
Activations: per layer and token, the tensors a Llama-style block saves for backward
(about 6h + 2·kv + 4·I values); a checkpointed block keeps only its input, plus one block's
full set while it is recomputed. ``selective`` checkpoints every n-th block (blocks 0, n,
2n, ...: ceil(layers / n) of them), the others keep everything.
"""

from __future__ import annotations

from dataclasses import dataclass

# Public architecture facts for configs that name a hub model this machine cannot fetch.
KNOWN_ARCHITECTURES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=False),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                          tie_word_embeddings=False),
}
GIB = 2**30


@dataclass(frozen=True)
class Architecture:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @classmethod
    def from_mapping(cls, c: dict) -> Architecture:
        return cls(
            hidden=c["hidden_size"], intermediate=c["intermediate_size"], layers=c["num_hidden_layers"],
            heads=c["num_attention_heads"], kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            vocab=c["vocab_size"], tied=bool(c.get("tie_word_embeddings", False)),
        )

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def block_params(self) -> int:
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_dim
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * self.block_params + self.hidden


@dataclass(frozen=True)
class Estimate:
    strategy: str
    offload: bool
    params_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    buffers_gib: float

    @property
    def states_gib(self) -> float:
        return self.params_gib + self.grads_gib + self.optimizer_gib

    @property
    def total_gib(self) -> float:
        return self.states_gib + self.activations_gib + self.buffers_gib


def state_bytes(strategy: str, params: int, ranks: int, bf16: bool, offload: bool = False,
                block_params: int = 0) -> tuple[float, float, float, float]:
    """(weights, grads, optimizer, in-flight buffers) bytes per rank for the model's states."""
    p, n = float(params), float(ranks)
    work = 2.0 if bf16 else 4.0  # bytes of the working copy of weights and gradients
    master_and_moments = 12.0 / n  # fp32 master (4) + Adam moments (8), sharded
    if strategy == "ddp":
        return 4 * p, 4 * p, 8 * p, 0.0
    if strategy == "fsdp":
        # Sharded fp32 everything, plus the current and the prefetched block unsharded.
        in_flight = 2 * block_params * work * 2  # weights + their gradients, 2 blocks
        return 4 * p / n, 4 * p / n, 8 * p / n, in_flight
    optimizer = 0.0 if offload else master_and_moments * p
    if strategy == "zero1":
        return work * p, work * p, optimizer, 0.0
    if strategy == "zero2":
        return work * p, work * p / n, optimizer, 0.0
    if strategy == "zero3":
        return work * p / n, work * p / n, optimizer, 2 * block_params * work
    raise ValueError(f"unknown strategy {strategy!r}")


def host_load_bytes(strategy: str, arch: Architecture, ranks: int, on_gpu: bool = True,
                    pretrained: bool = True) -> float:
    """Peak host bytes per rank while the model loads (see the module docstring)."""
    if strategy.removesuffix("+offload") in ("ddp", "zero1", "zero2"):
        return 4.0 * arch.params
    largest = 4.0 * max(arch.vocab * arch.hidden, arch.hidden * arch.intermediate)
    kept = largest / ranks if on_gpu else 4.0 * arch.params / ranks
    return kept + (0.0 if pretrained else largest)


def block_activation_values(arch: Architecture) -> int:
    """Values per token one Llama-style block keeps for backward when not checkpointed."""
    return 6 * arch.hidden + 2 * arch.kv_dim + 4 * arch.intermediate


def checkpointed_blocks(layers: int, checkpointing: bool | str, every: int = 2) -> int:
    """How many blocks recompute in backward under a policy (bools: the pre-policy configs)."""
    policy = {True: "full", False: "none"}.get(checkpointing, checkpointing)
    if policy == "none":
        return 0
    if policy == "full":
        return layers
    if policy == "selective":
        return -(-layers // every)  # transformers checkpoints blocks 0, every, 2*every, ...
    raise ValueError(f"unknown activation checkpointing policy {checkpointing!r}")


def activation_bytes(arch: Architecture, micro_batch: int, seq_len: int, bf16: bool,
                     checkpointing: bool | str, every: int = 2) -> float:
    element = 2 if bf16 else 4
    tokens = micro_batch * seq_len
    per_block_values = block_activation_values(arch)
    # Logits and their gradient are fp32 for the loss whatever the training dtype.
    logits = tokens * arch.vocab * 4 * 2
    recomputed = checkpointed_blocks(arch.layers, checkpointing, every)
    kept = (arch.layers - recomputed) * per_block_values
    stored = recomputed * arch.hidden + (per_block_values if recomputed else 0)
    return tokens * (kept + stored) * element + logits


def estimate(arch: Architecture, strategy: str, ranks: int, micro_batch: int, seq_len: int,
             bf16: bool, checkpointing: bool | str, offload: bool = False, every: int = 2) -> Estimate:
    w, g, o, buffers = state_bytes(strategy, arch.params, ranks, bf16, offload, arch.block_params)
    acts = activation_bytes(arch, micro_batch, seq_len, bf16, checkpointing, every)
    return Estimate(strategy, offload, w / GIB, g / GIB, o / GIB, acts / GIB, buffers / GIB)


def plan_table(arch: Architecture, ranks: int, seq_len: int, gpu_memory_gib: float, bf16: bool,
               checkpointing: bool | str, micro_batches=(1, 2, 4, 8, 16),
               every: int = 2, on_gpu: bool = True, pretrained: bool = True) -> tuple[list[dict], dict | None]:
    """Rows for every strategy (and offload variant), and the recommendation.

    Recommendation: the option that fits with 10% headroom and the largest micro-batch,
    preferring the least communication (ddp < zero1 < zero2 < fsdp < zero3 < offload).
    """
    order = [("ddp", False), ("zero1", False), ("zero2", False), ("fsdp", False), ("zero3", False),
             ("zero2", True), ("zero3", True)]
    rows, best = [], None
    for strategy, offload in order:
        fitting_mb = 0
        for mb in micro_batches:
            e = estimate(arch, strategy, ranks, mb, seq_len, bf16, checkpointing, offload, every)
            if e.total_gib <= 0.9 * gpu_memory_gib:
                fitting_mb = mb
        e1 = estimate(arch, strategy, ranks, 1, seq_len, bf16, checkpointing, offload, every)
        no_ckpt = estimate(arch, strategy, ranks, 1, seq_len, bf16, False, offload)
        row = {
            "host_load": host_load_bytes(strategy, arch, ranks, on_gpu, pretrained) / GIB,
            "strategy": strategy + ("+offload" if offload else ""),
            "weights": e1.params_gib, "grads": e1.grads_gib, "optimizer": e1.optimizer_gib,
            "buffers": e1.buffers_gib, "activations_mb1": e1.activations_gib,
            "activations_mb1_no_ckpt": no_ckpt.activations_gib, "total_mb1": e1.total_gib,
            "max_micro_batch": fitting_mb,
        }
        rows.append(row)
        if best is None and fitting_mb:
            best = row
    return rows, best


def format_table(rows: list[dict], best: dict | None, header: str, policy: str = "ckpt") -> str:
    lines = [header, "",
             f"| strategy | weights | grads | optimizer | buffers | activations/seq ({policy} / none) | total @ mb=1 | max micro-batch | host (load) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " **←**" if best is r else ""
        lines.append(
            f"| {r['strategy']}{mark} | {r['weights']:.1f} | {r['grads']:.1f} | {r['optimizer']:.1f} | "
            f"{r['buffers']:.1f} | {r['activations_mb1']:.1f} / {r['activations_mb1_no_ckpt']:.1f} | "
            f"{r['total_mb1']:.1f} | {r['max_micro_batch'] or 'does not fit'} | {r['host_load']:.1f} |"
        )
    lines.append("")
    lines.append("GiB per rank. " + (
        f"Recommended: {best['strategy']} with micro-batch {best['max_micro_batch']}."
        if best else "Nothing fits: add nodes, shorten sequences, or enable offload/checkpointing."))
    return "\n".join(lines)


def parse_memory(text: str) -> float:
    """'80GiB', '80GB', '80G' or '80' -> GiB."""
    lowered = text.strip().lower()
    for suffix, scale in (("gib", 1.0), ("gb", 1e9 / GIB), ("g", 1.0), ("tib", 1024.0)):
        if lowered.endswith(suffix):
            return float(lowered[: -len(suffix)]) * scale
    return float(lowered)


def architecture_for(cfg) -> Architecture:
    """From model.config, a local config.json, or a known public architecture by name."""
    import json
    from pathlib import Path

    if cfg.model.config is not None:
        values = dict(cfg.model.config)
        values.setdefault("vocab_size", cfg.tokenizer.vocab_size)
        try:
            return Architecture.from_mapping(values)
        except KeyError as missing:
            raise ValueError(f"model.config lacks {missing} needed to plan memory") from None
    local = Path(cfg.model.name_or_path) / "config.json"
    if local.is_file():
        return Architecture.from_mapping(json.loads(local.read_text()))
    name = cfg.model.name_or_path.lower()
    for key, values in KNOWN_ARCHITECTURES.items():
        if name.endswith(key):
            return Architecture.from_mapping(values)
    raise ValueError(
        f"cannot find the architecture of {cfg.model.name_or_path!r}: give a local directory with "
        f"config.json or one of {', '.join(KNOWN_ARCHITECTURES)}"
    )


def run_plan(cfg, nodes: int, gpus_per_node: int, gpu_memory: str, bf16: bool | None = None) -> str:
    arch = architecture_for(cfg)
    ranks = nodes * gpus_per_node
    use_bf16 = cfg.distributed.precision != "fp32" if bf16 is None else bf16
    policy, every = cfg.model.activation_checkpointing, cfg.model.activation_checkpointing_every
    pretrained = cfg.model.name_or_path is not None
    rows, best = plan_table(arch, ranks, cfg.data.seq_len, parse_memory(gpu_memory), use_bf16,
                            policy, every=every, pretrained=pretrained)
    described = {"none": "off", "full": "on (every block)",
                 "selective": f"selective ({checkpointed_blocks(arch.layers, policy, every)} of {arch.layers} blocks)"}
    header = (
        f"{cfg.model.name_or_path or 'model.config'}: {arch.params / 1e9:.2f}B parameters, "
        f"{nodes} node(s) x {gpus_per_node} GPU(s) = {ranks} ranks of {parse_memory(gpu_memory):.0f} GiB, "
        f"seq {cfg.data.seq_len}, {'bf16' if use_bf16 else 'fp32'}, activation checkpointing {described[policy]}"
    )
    table = format_table(rows, best, header, {"none": "none", "full": "ckpt", "selective": "selective"}[policy])
    return table + "\n" + host_line(rows, gpus_per_node)


def host_line(rows: list[dict], ranks_per_node: int) -> str:
    """The loading host memory per rank and per node, for each strategy."""
    by = {r["strategy"]: r["host_load"] for r in rows if not r["strategy"].endswith("+offload")}
    parts = [f"{name} {gib:.1f} GiB/rank ({gib * ranks_per_node:.1f} GiB/node)" for name, gib in by.items()]
    return ("Host memory while loading: " + ", ".join(parts)
            + ". fsdp/zero3 build on meta and read only their shards; ddp/zero1/zero2 build the fp32 model whole.")


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage alive in this process (the measurement side).

    Counting storages, not tensors, so views and DeepSpeed's flat buffers count once.
    """
    import gc

    import torch

    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor):
                continue
            tensor = obj._local_tensor if hasattr(obj, "_local_tensor") else obj
            storage = tensor.untyped_storage()
        except (ReferenceError, RuntimeError, NotImplementedError):
            continue
        key = (storage.data_ptr(), storage.device)
        if storage.data_ptr() and key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total
