"""Training: a typed config (config), checkpoints holding the full resumable state (checkpoint), AdamW with its
no-decay groups and warm-up + cosine schedule (optim).

    from hermesflow_fast.train import TrainConfig, load_config, CheckpointManager, build_optimizer, warmup_cosine
"""

from hermesflow_fast.train.checkpoint import CheckpointManager, LoadedCheckpoint, check_run_dir, is_nan_free
from hermesflow_fast.train.config import ConfigError, TrainConfig, config_to_dict, load_config, save_config
from hermesflow_fast.train.optim import (
    build_optimizer,
    param_groups,
    resolve_total_steps,
    resolve_warmup,
    warmup_cosine,
)

__all__ = [
    "CheckpointManager",
    "ConfigError",
    "LoadedCheckpoint",
    "TrainConfig",
    "build_optimizer",
    "check_run_dir",
    "config_to_dict",
    "is_nan_free",
    "load_config",
    "param_groups",
    "resolve_total_steps",
    "resolve_warmup",
    "save_config",
    "warmup_cosine",
]
