"""Training: the Pair-DPO trainer (trainer), its per-pair fused-head objective (objective), a typed config (config),
checkpoints holding the full resumable state (checkpoint, rng_state), AdamW with its no-decay groups and warm-up +
cosine schedule (optim), what a run folder allows on start and resume (resume), torchrun/DDP/FSDP2 setup (distributed).

    from hermesflow_fast.train import Trainer, load_config
    Trainer(load_config("configs/tiny.yaml", ["train.lr=1e-4"]), run_dir="runs/x").setup().train()
"""

import importlib

# name → submodule; imported on first use, so that reading a config (hermesflow_fast.train.config, which the command
# line imports to build its options) does not import the trainer, torch and transformers
_EXPORTS = {
    "CheckpointManager": "checkpoint", "LoadedCheckpoint": "checkpoint", "is_nan_free": "checkpoint",
    "ConfigError": "config", "TrainConfig": "config", "config_to_dict": "config", "load_config": "config",
    "save_config": "config", "PairDPOObjective": "objective", "build_optimizer": "optim", "param_groups": "optim",
    "resolve_total_steps": "optim", "resolve_warmup": "optim", "warmup_cosine": "optim", "ResumeError": "resume",
    "plan_run_dir": "resume", "NonFiniteError": "trainer", "Trainer": "trainer",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"hermesflow_fast.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'hermesflow_fast.train' has no attribute {name!r}")


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
