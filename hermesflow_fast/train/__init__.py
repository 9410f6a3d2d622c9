"""Training: the Pair-DPO trainer (trainer), its per-pair fused-head objective (objective), a typed config (config),
checkpoints holding the full resumable state (checkpoint, rng_state), AdamW with its no-decay groups and warm-up +
cosine schedule (optim), what a run folder allows on start and resume (resume), torchrun/DDP/FSDP2 setup (distributed).

    from hermesflow_fast.train import Trainer, load_config
    Trainer(load_config("configs/tiny.yaml", ["train.lr=1e-4"]), run_dir="runs/x").setup().train()
"""

from hermesflow_fast.train.checkpoint import CheckpointManager, LoadedCheckpoint, is_nan_free
from hermesflow_fast.train.config import ConfigError, TrainConfig, config_to_dict, load_config, save_config
from hermesflow_fast.train.objective import PairDPOObjective
from hermesflow_fast.train.optim import (
    build_optimizer,
    param_groups,
    resolve_total_steps,
    resolve_warmup,
    warmup_cosine,
)
from hermesflow_fast.train.resume import ResumeError, plan_run_dir
from hermesflow_fast.train.trainer import NonFiniteError, Trainer

__all__ = [
    "CheckpointManager",
    "ConfigError",
    "LoadedCheckpoint",
    "NonFiniteError",
    "PairDPOObjective",
    "ResumeError",
    "TrainConfig",
    "Trainer",
    "build_optimizer",
    "config_to_dict",
    "is_nan_free",
    "load_config",
    "param_groups",
    "plan_run_dir",
    "resolve_total_steps",
    "resolve_warmup",
    "save_config",
    "warmup_cosine",
]
