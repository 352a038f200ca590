"""Typed run configuration: YAML file + dotted CLI overrides -> validated ``RunConfig``.

One module per area of the config; this is the API the rest of shardtune imports.
"""

from shardtune.config.data import (
    DataSection,
    HFInputSection,
    MixtureSourceSection,
    PrepareSection,
    SplitRatios,
    SyntheticDataSection,
)
from shardtune.config.keys import explain_key, key_space, nearest_key
from shardtune.config.loading import (
    apply_overrides,
    default_config_path,
    dump_config,
    load_config,
    parse_override,
)
from shardtune.config.model import ModelSection, RunSection, TokenizerSection
from shardtune.config.run import RunConfig
from shardtune.config.training import (
    CheckpointSection,
    DistributedSection,
    EvalSection,
    FinetuneSection,
    FSDPSection,
    GenerateSection,
    LoraSection,
    MetricsSection,
    PreferenceSection,
    TrainSection,
)

__all__ = [
    "CheckpointSection", "DataSection", "DistributedSection", "EvalSection", "FSDPSection",
    "FinetuneSection", "GenerateSection", "HFInputSection", "LoraSection", "MetricsSection",
    "MixtureSourceSection", "ModelSection", "PrepareSection", "PreferenceSection", "RunConfig",
    "RunSection", "SplitRatios", "SyntheticDataSection", "TokenizerSection", "TrainSection",
    "apply_overrides", "default_config_path", "dump_config", "explain_key", "key_space",
    "load_config", "nearest_key", "parse_override",
]
