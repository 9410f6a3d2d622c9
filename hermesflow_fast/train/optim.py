"""AdamW with the usual no-decay groups, and linear warm-up + cosine decay over the run's actual step count.

Weight decay (``param_groups``): a trainable parameter is decayed unless it is
    * owned by an ``nn.Embedding`` (token/position embeddings),
    * owned by a normalization layer (``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, batch/instance norms), or
    * of dimension < 2 (biases, norm gains, scalars).
Show-o/HermesFlow meant the same but matched the substrings ``layer_norm.weight`` / ``embeddings.weight``, which Phi's
names (``input_layernorm``, ``final_layernorm``, ``embed_tokens``) never contain, so only biases escaped decay there
; matching on module types and shapes cannot miss a renamed module. The LM head (an ``nn.Linear``) decays.

Schedule (``warmup_cosine``), with s = the number of ``scheduler.step()`` calls so far (= optimizer steps taken):

    factor(s) = s / W                                                        for s < W  (0 at s = 0)
    factor(s) = m + (1 − m) · ½ (1 + cos(π · (s − W) / (N − W)))              for W ≤ s ≤ N
    factor(s) = m                                                            for s > N

lr(s) = factor(s) · peak lr, N = total optimizer steps of the run, W = warm-up steps < N, m = min_lr_ratio. The lr
reaches its minimum exactly at s = N, so decay always happens: HermesFlow's released config warmed up for 5,000
steps of a run that stopped after ≤ 5,000, and never left warm-up (docs/differences.md). Give N as the run will
actually take
(``resolve_total_steps``), never a nominal number.

    python -m pytest -q tests/train/test_optim.py
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["build_optimizer", "param_groups", "resolve_total_steps", "resolve_warmup", "warmup_cosine"]

_NORMS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two AdamW groups: ``weight_decay`` for weight matrices, 0 for biases, norms and
    embeddings (rule in the module docstring). Each group carries ``param_names``; empty groups are left out."""
    if weight_decay < 0:
        raise ValueError(f"param_groups: weight_decay must be >= 0, got {weight_decay}")
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag, *_NORMS)):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay: tuple[list[str], list[nn.Parameter]] = ([], [])
    no_decay: tuple[list[str], list[nn.Parameter]] = ([], [])
    for name, p in model.named_parameters():  # shared (tied) parameters come once, under their first name
        if not p.requires_grad:
            continue
        names, params = no_decay if (id(p) in no_decay_ids or p.ndim < 2) else decay
        names.append(name)
        params.append(p)
    groups = [
        {"params": params, "param_names": names, "weight_decay": wd}
        for (names, params), wd in ((decay, float(weight_decay)), (no_decay, 0.0))
        if params
    ]
    if not groups:
        raise ValueError(f"param_groups: {type(model).__name__} has no trainable parameters (all requires_grad=False)")
    return groups


def _fused_ok(params: list[torch.Tensor]) -> bool:
    """Fused AdamW: every parameter floating, all on CUDA, or all plain (not DTensor) CPU tensors."""
    if not params or not all(p.is_floating_point() for p in params):
        return False
    if all(p.is_cuda for p in params):
        return True
    from torch.distributed.tensor import DTensor

    return all(p.device.type == "cpu" and not isinstance(p, DTensor) for p in params)


def build_optimizer(model: nn.Module, cfg_train: Any) -> torch.optim.AdamW:
    """AdamW over ``param_groups(model, cfg_train.weight_decay)`` with ``cfg_train``'s lr, adam_betas and adam_eps
    (a ``config.TrainSection``). torch's fused kernel when ``_fused_ok``, foreach otherwise (on 2 CPU cores the fused
    step over 56 M parameters takes 43 ms against foreach's 275 ms)."""
    groups = param_groups(model, cfg_train.weight_decay)
    betas = tuple(float(b) for b in cfg_train.adam_betas)
    if len(betas) != 2:
        raise ValueError(f"build_optimizer: train.adam_betas must hold two numbers, got {list(cfg_train.adam_betas)}")
    params = [p for g in groups for p in g["params"]]
    impl = {"fused": True} if _fused_ok(params) else {"foreach": True}
    return torch.optim.AdamW(groups, lr=float(cfg_train.lr), betas=betas, eps=float(cfg_train.adam_eps), **impl)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` × peak, reached exactly at
    ``total_steps`` (the run's actual optimizer steps; must exceed ``warmup_steps``). Call ``.step()`` once per
    optimizer step. On resume, build the optimizer and this scheduler from the config, then load the optimizer's
    state (it holds the current lr), then the scheduler's (the step count; the shape comes from the arguments)."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"warmup_cosine: total_steps must be an int >= 1, got {total_steps!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_cosine: warmup_steps must be an int >= 0, got {warmup_steps!r}")
    if total_steps <= warmup_steps:
        raise ValueError(
            f"warmup_cosine: total_steps={total_steps} must be > warmup_steps={warmup_steps}, or the lr never leaves "
            f"warm-up and never decays (the original code's bug, docs/differences.md: 5,000 warm-up steps in a run of "
            f"<= 5,000)"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"warmup_cosine: min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
    warmup, total, floor = warmup_steps, total_steps, float(min_lr_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        progress = min(1.0, (step - warmup) / (total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def resolve_total_steps(cfg_train: Any, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: ``train.max_steps`` if set, else epochs × ``steps_per_epoch`` (the optimizer steps
    one pass over the data actually takes on this rank). Computed from the data, never from a nominal size
    (docs/differences.md)."""
    if cfg_train.max_steps is not None:
        return int(cfg_train.max_steps)
    if steps_per_epoch < 1:
        raise ValueError(f"resolve_total_steps: {steps_per_epoch} optimizer steps per epoch; nothing to train on")
    return int(cfg_train.epochs) * int(steps_per_epoch)


def resolve_warmup(cfg_train: Any, total_steps: int) -> int:
    """Warm-up steps: ``train.warmup_steps`` if > 0, else ceil(``train.warmup_ratio`` × total_steps), kept below
    total_steps. A warmup_steps that is not below total_steps is refused, naming both (docs/differences.md)."""
    if total_steps < 1:
        raise ValueError(f"resolve_warmup: total_steps must be >= 1, got {total_steps}")
    if cfg_train.warmup_steps > 0:
        if cfg_train.warmup_steps >= total_steps:
            raise ValueError(
                f"train.warmup_steps={cfg_train.warmup_steps} is not below the run's {total_steps} optimizer steps: "
                f"the lr would never leave warm-up (the original code's bug, docs/differences.md); lower it or use "
                f"train.warmup_ratio"
            )
        return int(cfg_train.warmup_steps)
    ratio = float(cfg_train.warmup_ratio)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"train.warmup_ratio={ratio} must lie in [0, 1)")
    return min(math.ceil(round(ratio * total_steps, 6)), total_steps - 1)  # round: 0.1 × 30 = 3.0000000000000004
