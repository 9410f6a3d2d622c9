"""DPO and HermesFlow's Pair-DPO losses on sequence log-probs, per pair, mean over pairs.

    a_b = π(y_w|x) − π_ref(y_w|x),   r_b = π(y_l|x) − π_ref(y_l|x),   z_b = β (a_b − r_b)
    sigmoid (DPO, arXiv 2305.18290):  ℓ = −(1−ε)·logσ(z) − ε·logσ(−z)        (ε = label_smoothing, cDPO)
    hinge (SLiC):                     ℓ = max(0, 1 − z)
    ipo (arXiv 2310.12036):           ℓ = (a − r − 1/(2β))²
    robust (rDPO):                    ℓ = (−(1−ε)·logσ(z) + ε·logσ(−z)) / (1 − 2ε)
    exo_pair, nca_pair, sppo_hard, apo_zero, apo_down, discopop: as in TRL's DPOTrainer.
    bco_pair:                         ℓ = −logσ(β a) − logσ(−β r)   (liger-kernel's; TRL's also shifts β a and β r
                                      by a running mean of the rewards, which a stateless loss cannot hold)

    Pair-DPO (HermesFlow, arXiv 2502.12148), for pair b with an understanding (caption) side and a generation
    (image) side:   L = mean_b [ c_und · ℓ(z_und,b) + c_gen · ℓ(z_gen,b) ]

Everything is computed in float32 at least (bf16 log-probs are upcast), ``logsigmoid`` everywhere (never
log(sigmoid), which is −inf at z ≈ −104 in fp32). Metrics use TRL's names and are detached 0-d tensors, so logging
them costs no host sync until the caller asks.

    python -m pytest tests/ops/test_dpo.py
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["DPO_LOSS_TYPES", "dpo_loss", "dpo_losses", "pair_dpo_loss"]

_LossFn = Callable[[torch.Tensor, torch.Tensor, float, float, float], torch.Tensor]


def _sigmoid(a, r, beta, eps, tau):
    z = beta * (a - r)
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _hinge(a, r, beta, eps, tau):
    return torch.relu(1 - beta * (a - r))


def _ipo(a, r, beta, eps, tau):
    return (a - r - 1 / (2 * beta)) ** 2


def _robust(a, r, beta, eps, tau):
    z = beta * (a - r)
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _exo_pair(a, r, beta, eps, tau):
    z = beta * (a - r)
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


def _nca_pair(a, r, beta, eps, tau):
    return -F.logsigmoid(beta * a) - 0.5 * F.logsigmoid(-beta * a) - 0.5 * F.logsigmoid(-beta * r)


def _bco_pair(a, r, beta, eps, tau):
    return -F.logsigmoid(beta * a) - F.logsigmoid(-beta * r)


def _sppo_hard(a, r, beta, eps, tau):
    return (a - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2


def _apo_zero(a, r, beta, eps, tau):
    return 1 - torch.sigmoid(beta * a) + torch.sigmoid(beta * r)


def _apo_down(a, r, beta, eps, tau):
    return torch.sigmoid(beta * a) + 1 - torch.sigmoid(beta * (a - r))


def _discopop(a, r, beta, eps, tau):
    z = beta * (a - r)
    modulation = torch.sigmoid(z / tau)
    return -F.logsigmoid(z) * (1 - modulation) + torch.exp(-z) * modulation


_LOSSES: dict[str, _LossFn] = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "robust": _robust,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
}
DPO_LOSS_TYPES: tuple[str, ...] = tuple(_LOSSES)


def check_dpo_options(beta: float, loss_type: str, label_smoothing: float = 0.0) -> None:
    """Raise ``ValueError`` for options no DPO variant can take; called eagerly by modules' constructors."""
    if loss_type not in _LOSSES:
        raise ValueError(f"loss_type={loss_type!r} is not supported; choose one of: {', '.join(DPO_LOSS_TYPES)}")
    if not (isinstance(beta, (int, float)) and beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if loss_type == "exo_pair":
        if not 0.0 < label_smoothing < 1.0:
            raise ValueError(
                f"label_smoothing must lie in (0, 1) for loss_type='exo_pair' (the EXO paper uses 1e-3), "
                f"got {label_smoothing}"
            )
    elif loss_type == "robust":
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5) for loss_type='robust', got {label_smoothing}")
    elif not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5], got {label_smoothing}")


_NAMES = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def _check_logps(tensors: Sequence[torch.Tensor], names: Sequence[str] = _NAMES) -> None:
    first = tensors[0]
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor of shape (B,), got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name} must have shape (B,), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
        if t.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {names[0]} has {tuple(first.shape)}")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {names[0]} is on {first.device}")
    if first.numel() == 0:
        raise ValueError(f"{names[0]} is empty: a DPO loss needs at least one pair")


def dpo_losses(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
) -> torch.Tensor:
    """(B,) float32 (or float64) loss of each pair; inputs are (B,) sequence log-probs. See the module docstring."""
    check_dpo_options(beta, loss_type, label_smoothing)
    tensors = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_logps(tensors)
    dtype = torch.promote_types(policy_chosen_logps.dtype, torch.float32)
    pc, pr, rc, rr = (t.to(dtype) for t in tensors)
    return _LOSSES[loss_type](pc - rc, pr - rr, float(beta), float(label_smoothing), float(discopop_tau))


def _metrics(pc, pr, rc, rr, beta: float, prefix: str = "") -> dict[str, torch.Tensor]:
    with torch.no_grad():
        chosen = beta * (pc.float() - rc.float())
        rejected = beta * (pr.float() - rr.float())
        return {
            f"{prefix}rewards/chosen": chosen.mean(),
            f"{prefix}rewards/rejected": rejected.mean(),
            f"{prefix}rewards/margins": (chosen - rejected).mean(),
            f"{prefix}rewards/accuracies": (chosen > rejected).float().mean(),
            f"{prefix}logps/chosen": pc.detach().float().mean(),
            f"{prefix}logps/rejected": pr.detach().float().mean(),
        }


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO loss, per pair, mean over pairs; returns ``(loss, metrics)`` with TRL's metric names.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) sequence log-probs under the policy (with grad).
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the frozen reference.
        beta: β, the KL strength. loss_type: one of ``DPO_LOSS_TYPES``. label_smoothing: ε (cDPO / rDPO / EXO).
    Returns:
        loss: 0-d float32. metrics: ``rewards/{chosen,rejected,margins,accuracies}``, ``logps/{chosen,rejected}``.
    """
    losses = dpo_losses(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type,
        label_smoothing,
    )
    metrics = _metrics(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    metrics["loss"] = losses.detach().mean()
    return losses.mean(), metrics


def pair_dpo_loss(
    und: Sequence[torch.Tensor] | None,
    gen: Sequence[torch.Tensor] | None,
    beta: float = 0.2,
    und_coeff: float = 1.0,
    gen_coeff: float = 1.0,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """HermesFlow's Pair-DPO: L = mean_b [c_und·ℓ(z_und,b) + c_gen·ℓ(z_gen,b)], one term per side of each pair.

    Args:
        und: (policy_chosen, policy_rejected, ref_chosen, ref_rejected) caption log-probs, each (B,); or None.
        gen: the same four for the image side (masked-token log-probs, one mask shared by chosen and rejected).
        beta: β (0.2 in the paper). und_coeff, gen_coeff: c_und, c_gen (1.0 in the paper).
    Returns:
        (loss, metrics): metrics are ``und/…`` and ``gen/…`` with TRL's names, plus ``und/loss``, ``gen/loss``.
    Pair b's two sides must be the same homologous record, so both sides have the same B. Either side may be None
    (that side contributes nothing), not both.
    """
    if und is None and gen is None:
        raise ValueError("pair_dpo_loss needs at least one of und=(4 tensors) or gen=(4 tensors)")
    sides = [(name, coeff, parts) for name, coeff, parts in (("und", und_coeff, und), ("gen", gen_coeff, gen))
             if parts is not None]
    for side, _, parts in sides:
        if len(parts) != 4:
            raise ValueError(
                f"{side} must be (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps),"
                f" got {len(parts)} items"
            )
        _check_logps(parts, [f"{side}[{i}] ({n})" for i, n in enumerate(_NAMES)])
    if len(sides) == 2 and und[0].shape != gen[0].shape:
        raise ValueError(
            f"und has {und[0].shape[0]} pairs but gen has {gen[0].shape[0]}: Pair-DPO pairs both sides of the same "
            "records"
        )
    total = 0.0
    metrics: dict[str, torch.Tensor] = {}
    for side, coeff, parts in sides:
        losses = dpo_losses(*parts, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
        total = total + coeff * losses  # (B,): the two terms of pair b are added before the mean over pairs
        metrics.update(_metrics(*parts, beta=beta, prefix=f"{side}/"))
        metrics[f"{side}/loss"] = losses.detach().mean()
    loss = total.mean()
    metrics["loss"] = loss.detach()
    return loss, metrics
