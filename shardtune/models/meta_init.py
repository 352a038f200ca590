"""Build a Hugging Face model on the ``meta`` device, and give each tensor its values later.

A model built on ``meta`` costs no host memory; the strategy shards it and then asks, tensor
by tensor, for the values each rank keeps. Values come from a safetensors checkpoint
(``sharded_load``) or from the model's own initialisation, replayed here module by module
so that a sharded run starts from exactly the weights a full ``from_config`` /
``from_pretrained`` gives under the same seed:

* Random draws on ``meta`` tensors consume nothing from torch's generator. ``RngReplay``
  runs each such draw on a scratch CPU tensor of the same shape (freed at once), so the
  generator advances exactly as in a full build and every later draw matches.
* Transformers initialises a model in ``post_init`` (nested, once per sub-model) through
  ``_initialize_weights(module)``. While building, each call records the generator state
  before it and the tensors the module owns then. To produce a tensor later, its last
  recorded module is materialised on CPU (its own tensors only), the generator state is
  restored, and ``_init_weights`` runs again: the same draws, the same values, at the cost
  of one module's tensors at a time (the largest is the embedding).
* A tensor that the replay leaves unwritten (an init that only a constructor performs)
  is an error, not a silent garbage value: those models load with a strategy's full path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
RANDOM_OPS = {
    _aten.uniform_.default, _aten.normal_.default, _aten.bernoulli_.float, _aten.bernoulli_.Tensor,
    _aten.random_.default, getattr(_aten.random_, "from"), _aten.random_.to, _aten.exponential_.default,
    _aten.log_normal_.default, _aten.cauchy_.default, _aten.geometric_.default,
}


class RngReplay(TorchDispatchMode):
    """Advance the CPU generator for random draws on meta tensors as if they were real."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in RANDOM_OPS and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            generator = kwargs.get("generator")
            if generator is None or generator.device.type == "cpu":
                scratch = torch.empty(args[0].shape, dtype=args[0].dtype)
                func(scratch, *args[1:], **kwargs)
                del scratch
        return func(*args, **kwargs)


@dataclass
class InitRecord:
    module: torch.nn.Module
    owner: torch.nn.Module  # the PreTrainedModel whose ``_init_weights`` handles ``module``
    rng_state: torch.Tensor
    # The module's own tensors when it was initialised, by slot ("_parameters"/"_buffers",
    # name); kept alive so their ids stay unique after sharding replaces them in the module.
    slots: list[tuple[str, str, torch.Tensor]] = field(default_factory=list)

    @property
    def tensor_ids(self) -> set[int]:
        return {id(t) for _, _, t in self.slots}


class InitRecorder:
    """Patches ``PreTrainedModel`` while a meta model is built (or initialised) so that the
    initialisation runs on meta with the generator advancing, and records each module's call."""

    def __init__(self) -> None:
        self.records: list[InitRecord] = []

    @contextlib.contextmanager
    def recording(self, run_init_on_meta: bool) -> Iterator[None]:
        from transformers import PreTrainedModel

        original_initialize = PreTrainedModel._initialize_weights
        original_init_weights = PreTrainedModel.init_weights
        recorder = self

        def _initialize_weights(model_self, module, is_custom_code: bool = False):
            if not getattr(module, "_is_hf_initialized", False):
                recorder.records.append(
                    InitRecord(module, model_self, torch.get_rng_state(), _slots(module))
                )
            return original_initialize(model_self, module, is_custom_code)

        def init_weights(model_self):
            # Transformers skips initialisation on meta; here it must run, so the generator
            # advances as in a full build and each module's draw is recorded.
            model_self.initialize_weights()
            model_self.tie_weights(recompute_mapping=False)

        PreTrainedModel._initialize_weights = _initialize_weights
        if run_init_on_meta:
            PreTrainedModel.init_weights = init_weights
        try:
            with RngReplay():
                yield
        finally:
            PreTrainedModel._initialize_weights = original_initialize
            PreTrainedModel.init_weights = original_init_weights


def _slots(module: torch.nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    return [(store, key, t) for store in ("_parameters", "_buffers")
            for key, t in getattr(module, store).items() if t is not None]


def build_meta(auto_class, config, *, replay_init: bool, **kwargs) -> tuple[torch.nn.Module, InitRecorder]:
    """``auto_class.from_config(config)`` on meta. ``replay_init``: advance the generator and
    record initialisation exactly as a full ``from_config`` would (a model from a config);
    False for a checkpoint, whose missing tensors ``record_missing_init`` records later."""
    recorder = InitRecorder()
    if replay_init:
        with torch.device("meta"), recorder.recording(run_init_on_meta=True):
            model = auto_class.from_config(config, **kwargs)
    else:
        with torch.device("meta"):
            model = auto_class.from_config(config, **kwargs)
    return model, recorder


def record_missing_init(model: torch.nn.Module, loaded: set[str], recorder: InitRecorder) -> None:
    """What ``from_pretrained`` does for the tensors a checkpoint lacks (a new task head,
    non-persistent buffers such as rotary ``inv_freq``): initialise the whole model with the
    loaded tensors flagged, so only the others draw from the generator."""
    flagged = []
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if name in loaded:
            tensor._is_hf_initialized = True
            flagged.append(tensor)
    try:
        with recorder.recording(run_init_on_meta=False):
            model.initialize_weights()
    finally:
        for tensor in flagged:
            del tensor._is_hf_initialized
        for module in model.modules():
            module.__dict__.pop("_is_hf_initialized", None)


class InitValues:
    """Produces, module by module, the values the recorded initialisation gives each tensor."""

    def __init__(self, model: torch.nn.Module, recorder: InitRecorder) -> None:
        self.records = recorder.records
        # Names to the tensors as built: sharding replaces the parameter objects later, the
        # records know the originals. Tied tensors appear once, under their first name.
        self.built = {name: t for name, t in (*model.named_parameters(), *model.named_buffers())}

    def groups(self, names: set[str]) -> Iterator[dict[str, torch.Tensor]]:
        """For the tensors named (parameter and buffer names of the model as built): dicts
        of name -> full CPU tensor, one dict per recorded module, freed by the caller."""
        wanted: dict[int, list[str]] = {}
        for name in names:
            wanted.setdefault(id(self.built[name]), []).append(name)
        last: dict[int, int] = {}
        for index, record in enumerate(self.records):
            for tid in record.tensor_ids & wanted.keys():
                last[tid] = index
        missing = [n for tid, ns in wanted.items() if tid not in last for n in ns]
        if missing:
            raise ValueError(f"no initialisation of {missing} was recorded: cannot initialise them sharded")
        by_record: dict[int, list[int]] = {}
        for tid, index in last.items():
            by_record.setdefault(index, []).append(tid)
        state = torch.get_rng_state()
        try:
            for index in sorted(by_record):
                values = self._replay(self.records[index], wanted.keys())
                out = {}
                for tid in by_record[index]:
                    tensor = values[tid]
                    if tensor.is_floating_point() and torch.isnan(tensor).any():
                        raise ValueError(
                            f"{wanted[tid]}: {type(self.records[index].module).__name__}'s _init_weights "
                            "does not write every value; this model cannot be initialised sharded"
                        )
                    for name in wanted[tid]:
                        out[name] = tensor
                yield out
        finally:
            torch.set_rng_state(state)

    def _replay(self, record: InitRecord, wanted) -> dict[int, torch.Tensor]:
        """Run one module's recorded ``_init_weights`` on CPU copies of its own tensors; those
        not wanted (loaded from a checkpoint) are flagged as transformers flags loaded ones,
        so their draws are skipped as they were then."""
        from transformers import initialization

        module = record.module
        saved = {store: dict(getattr(module, store)) for store in ("_parameters", "_buffers")}
        values: dict[int, torch.Tensor] = {}
        try:
            for store, key, built in record.slots:
                real = torch.full(built.shape, float("nan"), dtype=built.dtype) \
                    if built.is_floating_point() else torch.zeros(built.shape, dtype=built.dtype)
                if isinstance(built, torch.nn.Parameter):
                    real = torch.nn.Parameter(real, built.requires_grad)
                if id(built) not in wanted:
                    real._is_hf_initialized = True
                getattr(module, store)[key] = real
                values[id(built)] = real.data
            torch.set_rng_state(record.rng_state)
            with torch.no_grad(), initialization.guard_torch_init_functions():
                record.owner._init_weights(module)
        finally:
            for store, tensors in saved.items():
                getattr(module, store).update(tensors)
        return values
