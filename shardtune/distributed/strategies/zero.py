"""DeepSpeed ZeRO stages 1-3 through ``deepspeed.initialize``.

The DeepSpeed config is generated from ours so batch sizes, clipping and precision cannot
disagree between the two; ``distributed.deepspeed`` holds raw keys merged on top for
anything we do not model (bucket sizes, offload, ...).

Communication overlap is generated, and overridable through that pass-through:
``zero_optimization.overlap_comm`` is on with a GPU (gradient reduction runs on a side
stream during backward; off on CPU, where gloo has no streams to overlap with),
``contiguous_gradients`` is on (gradients copied into one buffer as they are produced, no
fragmentation), and the bucket sizes follow the hidden size (``bucket_sizes``). A raw key,
e.g. ``distributed.deepspeed.zero_optimization.overlap_comm=false``, wins over the generated one.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

from shardtune.config import RunConfig
from shardtune.distributed.strategies.base import StepOutcome, Strategy, apply_compile
from shardtune.optim import build_optimizer, build_scheduler


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def bucket_sizes(hidden_size: int, stage: int) -> dict[str, Any]:
    """Communication buckets scaled to the model, as DeepSpeed's own "auto" rules do.

    DeepSpeed's fixed defaults (5e8 elements) allocate gigabytes of buffers per rank even
    for a tiny model: measured 2 GB per rank for a 4M-parameter ZeRO-3 run on CPU.
    """
    square = hidden_size * hidden_size
    sizes: dict[str, Any] = {"reduce_bucket_size": square, "allgather_bucket_size": square}
    if stage == 3:
        sizes.update(
            stage3_prefetch_bucket_size=int(0.9 * square),
            stage3_param_persistence_threshold=10 * hidden_size,
        )
    return sizes


def deepspeed_config(
    cfg: RunConfig, world_size: int, stage: int, bf16: bool, on_gpu: bool, hidden_size: int | None = None
) -> dict[str, Any]:
    train = cfg.train
    accum = train.global_batch_size // (train.micro_batch_size * world_size)
    generated: dict[str, Any] = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": train.max_grad_norm or 0.0,
        "bf16": {"enabled": bf16},
        "zero_optimization": {
            "stage": stage,
            "overlap_comm": on_gpu,
            "contiguous_gradients": True,
        },
        # Our optimizer is torch AdamW with decay/no-decay groups; DeepSpeed only wraps it.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if stage == 3:
        generated["zero_optimization"].update(
            stage3_gather_16bit_weights_on_model_save=False,
        )
    if hidden_size:
        generated["zero_optimization"].update(bucket_sizes(hidden_size, stage))
    return deep_merge(generated, cfg.distributed.deepspeed)


def partition_only_init():
    import deepspeed

    class PartitionOnlyInit(deepspeed.zero.Init):
        """``zero.Init`` without its broadcast of every new parameter from rank 0.

        The broadcast makes random constructor values agree across ranks; here every rank
        writes its own partition from the checkpoint or the replayed init afterwards, so it
        would only cost a full-size write of each parameter on every rank (resident memory
        the allocator then keeps) and the model's bytes over the network. Overrides
        DeepSpeed's ``_zero_init_param`` (0.19).
        """

        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            param.partition()

    return PartitionOnlyInit


def partition_view(rank: int):
    """``load_into``'s view of ZeRO-3 parameters: rank r holds elements ``r*p .. r*p + p`` of
    the flattened parameter in ``ds_tensor`` (``p``: the partition size, the last one
    padded), which is how ``zero.Init`` partitions; buffers are whole on every rank."""

    def view(name: str, tensor: torch.Tensor) -> tuple[int, torch.Tensor]:
        part = getattr(tensor, "ds_tensor", None)
        if part is None:
            return 0, tensor.data
        size = part.numel()
        start = rank * size
        return start, part.narrow(0, 0, max(0, min(size, tensor.ds_numel - start)))

    return view


class ZeroStrategy(Strategy):
    def __init__(self, cfg: RunConfig, ctx, stage: int):
        super().__init__(cfg, ctx)
        self.stage = stage
        self.name = f"zero{stage}"
        if ctx.device.type == "cpu":
            # Must be set before deepspeed is first imported, or it probes for CUDA.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        self.ds_config = deepspeed_config(
            cfg, ctx.world_size, stage, self.bf16, on_gpu=ctx.device.type == "cuda"
        )

    def build_model(self, tokenizer, label_names: list[str] | None = None) -> torch.nn.Module:
        # ZeRO-3 partitions every parameter: built on meta here, then rebuilt partitioned in
        # ``setup``. ZeRO-1/2 keep whole weights on every rank: the full build.
        if self.stage == 3:
            return self.build_meta_model(tokenizer, label_names)
        return super().build_model(tokenizer, label_names)

    def _partitioned(self, meta_model: torch.nn.Module) -> torch.nn.Module:
        """The meta-built model again, under ``deepspeed.zero.Init``: each parameter is
        partitioned as its module is constructed (construction-time init switched off, the
        values come from ``self.weights``), then every rank fills its own partitions."""
        import deepspeed
        from transformers.initialization import no_init_weights

        from shardtune.models.loading import apply_activation_checkpointing
        from shardtune.models.sharded_load import peak_host_memory_mib

        ds_config = deepspeed_config(self.cfg, self.ctx.world_size, 3, self.bf16,
                                     on_gpu=self.ctx.device.type == "cuda",
                                     hidden_size=meta_model.config.hidden_size)
        # What deepspeed.initialize does first: wrap the existing process group, so zero.Init
        # sees the real world size.
        deepspeed.init_distributed(dist_backend=self.ctx.backend, dist_init_required=False)
        with no_init_weights(), partition_only_init()(config_dict_or_path=ds_config):
            model = type(meta_model)(meta_model.config)
        model.tie_weights()
        trainable = {name: p.requires_grad for name, p in meta_model.named_parameters()}
        for name, param in model.named_parameters():
            param.requires_grad_(trainable[name])
        model.config.use_cache = False
        apply_activation_checkpointing(model, self.cfg.model)
        self.weights.load_into(model, partition_view(self.ctx.rank))
        self.weights = None
        self.load_peak_host_mib = peak_host_memory_mib()
        return model

    def setup(self, model: torch.nn.Module, total_steps: int) -> None:
        import deepspeed

        if self.weights is not None:
            model = self._partitioned(model)  # zero.Init placed the partitions already
        else:
            model.to(self.ctx.device)
        # ZeRO-1/2 leave the module's forward alone (only gradients and optimizer states are
        # partitioned), so compiled forwards run unchanged; zero3 is refused in __init__.
        apply_compile(model, self.cfg.train.compile)
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        self.ds_config = deepspeed_config(
            self.cfg, self.ctx.world_size, self.stage, self.bf16,
            on_gpu=self.ctx.device.type == "cuda", hidden_size=hidden,
        )
        optimizer = build_optimizer(model, self.cfg.train, self.lr_scales)
        # The scheduler wraps the client optimizer; DeepSpeed's ZeRO optimizers read the
        # learning rate from those same param_groups at every step.
        self.scheduler = build_scheduler(optimizer, self.cfg.train, total_steps)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config, dist_init_required=False
        )
        self._client_optimizer = optimizer
        self.model = self.engine

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.engine.module

    def current_lr(self) -> float:
        groups = self._client_optimizer.param_groups
        base = [g for g in groups if g.get("lr_scale", 1.0) == 1.0] or groups
        return float(base[0]["lr"])

    def backward(self, loss: torch.Tensor, is_last: bool) -> None:
        # The loop already divided by the step's token count: no second scaling by GAS.
        self.engine.backward(loss, scale_wrt_gas=False)
        if not is_last:
            self.engine.step()  # advances DeepSpeed's micro-step counter; no update yet

    def step(self, max_grad_norm: float | None, skip: bool) -> StepOutcome:
        # DeepSpeed clips with ``gradient_clipping`` and skips the update by itself when the
        # global gradient norm is not finite, agreed across ranks with an all-reduce. A
        # non-finite loss poisons its rank's gradients, and through the reduction everyone's.
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        applied = bool(self.engine.was_step_applied())
        if skip and applied:
            raise RuntimeError(
                "DeepSpeed applied an update although the step's loss was not finite "
                "(its gradients were finite, so the engine saw nothing to skip)"
            )
        self.scheduler.step()
        return StepOutcome(grad_norm=norm, applied=applied)

    # -- checkpoint state in the shared logical layout ------------------------------------
    # DeepSpeed keeps fp32 masters and Adam moments in flat, padded per-rank partitions.
    # Its safe_get/set_full_* helpers translate between those and per-parameter tensors.
    _MOMENTS = ("exp_avg", "exp_avg_sq")

    def _flat_partitions(self) -> list[torch.Tensor]:
        if self.stage == 3:
            return list(self.optimizer.fp32_partitioned_groups_flat)
        return list(self.optimizer.single_partition_of_fp32_groups)

    def _ensure_optimizer_states(self) -> None:
        """Make the per-parameter views of Adam's moments usable before any step or load.

        A fresh engine has no moments until its first step, so a resume would have nowhere
        to write them. And ZeRO-1/2 link each parameter to its slice of the moments once,
        right after the first param group steps, when the other groups have no state yet:
        their links stay empty. Creating the states and relinking fixes both.
        """
        base = self.optimizer.optimizer
        on_device = any(g.get("fused") or g.get("capturable") for g in base.param_groups)
        for flat in self._flat_partitions():
            state = base.state[flat]
            if "exp_avg" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=flat.device if on_device else "cpu")
                state["exp_avg"] = torch.zeros_like(flat)
                state["exp_avg_sq"] = torch.zeros_like(flat)
        if self.stage < 3:
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()

    def _base_optimizer_states(self) -> list[dict]:
        return [s for s in self.optimizer.optimizer.state.values() if "step" in s]

    def _optimizer_step(self) -> torch.Tensor:
        states = self._base_optimizer_states()
        return states[0]["step"].detach().clone().cpu() if states else torch.tensor(0.0)

    def checkpoint_state(self) -> dict:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        self._ensure_optimizer_states()
        step = self._optimizer_step()
        rank, world = self.ctx.rank, self.ctx.world_size
        model, optim = {}, {}
        for index, (name, param) in enumerate(self.unwrapped.named_parameters()):
            if not param.requires_grad:
                # Frozen (fine-tuning): no fp32 master and no moments, only the weight itself.
                full = self._full_frozen_weight(param)
                if index % world == rank:
                    model[name] = full
                continue
            # Collective under ZeRO-3: every rank gathers every parameter, in the same order.
            full = safe_get_full_fp32_param(param)
            moments = {k: safe_get_full_optimizer_state(param, k) for k in self._MOMENTS}
            if index % world != rank:
                continue  # each rank keeps (and writes) a disjoint 1/world of the tensors
            model[name] = full.detach().cpu()
            optim[name] = {"step": step.clone(), **{k: v.detach().cpu() for k, v in moments.items()}}
        return {"model": model, "optim": {"state": optim}}

    def _full_frozen_weight(self, param) -> torch.Tensor:
        if self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                return param.detach().float().cpu().clone()
        return param.detach().float().cpu().clone()

    def checkpoint_template(self) -> dict:
        model, optim = {}, {}
        for name, param in self.unwrapped.named_parameters():
            shape = tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)
            model[name] = torch.empty(shape, dtype=torch.float32)
            if param.requires_grad:
                optim[name] = {"step": torch.tensor(0.0), **{k: torch.empty(shape) for k in self._MOMENTS}}
        return {"model": model, "optim": {"state": optim}}

    def load_checkpoint_state(self, filled: dict) -> None:
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self._ensure_optimizer_states()
        device = self.ctx.device
        for name, param in self.unwrapped.named_parameters():
            full = filled["model"][name].to(device)
            # The module's working copy (partitioned under ZeRO-3) and the fp32 master are
            # separate tensors: both must be set, or the first forward uses stale weights.
            if self.stage == 3:
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if self.ctx.rank == 0:
                        param.data.copy_(full.to(param.dtype))
            else:
                param.data.copy_(full.to(param.dtype))
            if not param.requires_grad:
                continue  # frozen: the weight is all there is
            safe_set_full_fp32_param(param, full)
            for key in self._MOMENTS:
                safe_set_full_optimizer_state(param, filled["optim"]["state"][name][key].to(device), key)
        steps = [entry["step"] for entry in filled["optim"]["state"].values()]
        for state in self._base_optimizer_states():
            state["step"] = steps[0].clone().to(state["step"].device, state["step"].dtype)
