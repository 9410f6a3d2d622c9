"""A coarse memory estimate of a training run, printed by ``hermesflow train --dry-run``.

    weights 4P + gradients 4P + AdamW moments 8P (fp32 master weights; bf16 autocast keeps them fp32)
    + reference 4P (0 with train.precompute_ref_logps)
    + activations ≈ tokens_per_micro_batch · d · layers · 34 bytes (fp32; ~half under bf16 autocast; ~2 · d per
      layer with activation checkpointing)  + one chunk of head logits (256 MiB CPU / 512 MiB CUDA)
Per process; FSDP divides the first three terms by the number of processes.
"""

from __future__ import annotations

import json
from pathlib import Path

from hermesflow_fast.model.config import ModelConfig

__all__ = ["estimate_memory"]


def _model_config(cfg, vocab_size: int) -> ModelConfig:
    m = cfg.model
    if m.init_from and (Path(m.init_from) / "config.json").is_file():
        return ModelConfig.from_dict(json.loads((Path(m.init_from) / "config.json").read_text()))
    if m.config == "show_o_512":
        return ModelConfig.show_o_512()
    return ModelConfig.tiny(vocab_size=vocab_size)


def estimate_memory(cfg, data, world_size: int = 1) -> str:
    mc = _model_config(cfg, data.vocab.vocab_size)
    P = mc.num_parameters()
    shard = world_size if cfg.dist.strategy == "fsdp" else 1
    states = 16 * P / shard
    ref = 0 if cfg.train.precompute_ref_logps else 4 * P
    per_tok = 2 * mc.hidden_size if cfg.model.activation_checkpointing else 34 * mc.hidden_size
    act = cfg.data.token_budget * per_tok * mc.num_hidden_layers
    logits = 256 * 2**20
    total = states + ref + act + logits
    gib = 2**30
    return (f"# memory estimate per process: {total / gib:.2f} GiB  (model {P / 1e6:.1f}M params: weights+grads+AdamW "
            f"{states / gib:.2f} GiB, reference {ref / gib:.2f} GiB, activations of {cfg.data.token_budget} tokens "
            f"{act / gib:.2f} GiB, head chunk {logits / gib:.2f} GiB)")
