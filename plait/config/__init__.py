"""One frozen, typed configuration tree: `schema` (the sections) -> `checks` -> `load`
(TOML + overrides).

    # validated; ConfigError names key and fix
    cfg = plait.config.load("my.toml", ["parallel.dp=2"])
    # the checks that need the world size
    plait.config.validate_layout(cfg, world_size)
"""

from plait.config.checks import (
    accumulation_steps,
    check_choice,
    check_compression,
    check_options,
    check_pipeline,
    check_sync,
    validate,
    validate_layout,
)
from plait.config.load import from_dict, load, parse_override, split_args, to_dict, to_toml
from plait.config.schema import (
    CHOICES,
    CheckpointConfig,
    CompressionConfig,
    Config,
    DataConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    SyncConfig,
    TrainConfig,
)
from plait.errors import ConfigError

__all__ = [
    "CHOICES", "CheckpointConfig", "CompressionConfig", "Config", "ConfigError", "DataConfig",
    "LogConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "SyncConfig", "TrainConfig",
    "accumulation_steps", "check_choice", "check_compression", "check_options", "check_pipeline",
    "check_sync", "from_dict", "load", "parse_override", "split_args", "to_dict", "to_toml",
    "validate", "validate_layout",
]
