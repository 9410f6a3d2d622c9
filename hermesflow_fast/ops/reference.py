"""Plain-torch twins of every public op: the test oracle, the CPU fallback and the benchmark baseline.

Nothing here is clever. Each function states the math in the most direct torch it can, materializing whatever it
needs (full logits included); the fast paths in ``hermesflow_fast.ops`` and ``kernels/`` must agree with it.

    LFQ (Show-o's MAGVIT-v2 quantizer), over the last dim C of z:
        bit_c = [z_c > 0],  index = Σ_c bit_c · 2^(C−1−c)          (most significant channel first)
        code_c = +1 if bit_c else −1
    per-token log-prob of a linear head:
        logp_t = (x_t Wᵀ + b)[y_t] − logsumexp(x_t Wᵀ + b),  0 where y_t == ignore_index
    DPO, per pair (TRL's names):
        chosen_logratios   = π_c − ref_c,   rejected_logratios = π_r − ref_r
        z = β (chosen_logratios − rejected_logratios);  sigmoid loss = −logσ(z)   (and the variants below)
    Pair-DPO (HermesFlow), per pair b:
        L = mean_b [ c_und · ℓ(z_und,b) + c_gen · ℓ(z_gen,b) ]
    nearest code (VQ), per row x_n of x (N, D) over codebook (K, D):
        index_n = argmin_k ||c_k||² − 2 ⟨x_n, c_k⟩     (= argmin_k ||x_n − c_k||²), the lowest k on ties

Used by: tests/ops/*, hermesflow_fast/benchmarks/logprobs.py, and the CPU fallback of ``ops.lfq``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "DPO_LOSS_TYPES",
    "dpo_loss",
    "dpo_per_pair_losses",
    "fused_linear_dpo",
    "lfq_codes",
    "lfq_quantize",
    "linear_logprobs",
    "nearest_code",
    "pair_dpo_loss",
    "selective_logprobs",
]

# ---------------------------------------------------------------------------------------------------------------------
# LFQ
# ---------------------------------------------------------------------------------------------------------------------


def lfq_quantize(z: torch.Tensor) -> torch.Tensor:
    """(..., C) float -> (...,) int64 index, channel 0 is the most significant bit."""
    c = z.shape[-1]
    weights = 2 ** torch.arange(c - 1, -1, -1, device=z.device, dtype=torch.int64)  # (C,)
    return ((z > 0).to(torch.int64) * weights).sum(-1)


def lfq_codes(indices: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(...,) int index -> (..., bits) ±1 code vectors, inverse of :func:`lfq_quantize` on the signs."""
    shifts = torch.arange(bits - 1, -1, -1, device=indices.device, dtype=torch.int64)  # (bits,)
    bit = (indices.to(torch.int64).unsqueeze(-1) >> shifts) & 1
    return (bit * 2 - 1).to(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Per-token log-probs of a linear head (materializes the logits)
# ---------------------------------------------------------------------------------------------------------------------


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """log p(target) per token, the naive way: full logits, log_softmax, gather.

    Computes in float32 at least (float64 stays float64), so it is the oracle for any input dtype.
    hidden (..., H), weight (V, H), targets (...) -> (...)
    """
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(dtype) @ weight.to(dtype).t()  # (..., V)
    if bias is not None:
        logits = logits + bias.to(dtype)
    keep = targets != ignore_index
    safe = torch.where(keep, targets, torch.zeros_like(targets))
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, logp, torch.zeros_like(logp))


def selective_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """TRL-style ``selective_log_softmax``: gather minus a row-by-row logsumexp over materialized logits.

    Only the temporary of the normalizer is capped; the logits themselves are whole. Benchmark baseline.
    logits (N, V), targets (N,) in range -> (N,)
    """
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
    lse = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])
    return picked - lse


# ---------------------------------------------------------------------------------------------------------------------
# DPO losses
# ---------------------------------------------------------------------------------------------------------------------

DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
    "discopop",
)


def dpo_per_pair_losses(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
) -> torch.Tensor:
    """(B,) loss of each pair, written from the papers' formulas with softplus: −logσ(u) = softplus(−u).

    a, r = chosen / rejected log-ratios, z = β(a − r), ε = label_smoothing.
    """
    a = policy_chosen_logps - ref_chosen_logps
    r = policy_rejected_logps - ref_rejected_logps
    z = beta * (a - r)
    eps = label_smoothing
    sp = F.softplus  # sp(−u) = −logσ(u)
    table = {
        "sigmoid": lambda: (1 - eps) * sp(-z) + eps * sp(z),  # DPO / cDPO
        "hinge": lambda: (1 - z).clamp_min(0),  # SLiC
        "ipo": lambda: (a - r - 0.5 / beta) ** 2,  # IPO
        "robust": lambda: ((1 - eps) * sp(-z) - eps * sp(z)) / (1 - 2 * eps),  # rDPO
        # EXO (K=2): KL([σ(z), σ(−z)] ‖ [1−ε, ε])
        "exo_pair": lambda: torch.sigmoid(z) * (-sp(-z) - math.log1p(-eps))
        + torch.sigmoid(-z) * (-sp(z) - math.log(eps)),
        "nca_pair": lambda: sp(-beta * a) + 0.5 * sp(beta * a) + 0.5 * sp(beta * r),
        "bco_pair": lambda: sp(-beta * a) + sp(beta * r),  # liger-kernel's (TRL's with no running-mean shift)
        "sppo_hard": lambda: (a - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2,
        "apo_zero": lambda: torch.sigmoid(-beta * a) + torch.sigmoid(beta * r),
        "apo_down": lambda: torch.sigmoid(beta * a) + torch.sigmoid(-z),
        "discopop": lambda: sp(-z) * torch.sigmoid(-z / discopop_tau) + torch.exp(-z) * torch.sigmoid(z / discopop_tau),
    }
    return table[loss_type]()


def dpo_metrics(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> dict[str, torch.Tensor]:
    """TRL's logged DPO metrics, as detached 0-d tensors (no host sync)."""
    with torch.no_grad():
        chosen = beta * (policy_chosen_logps - ref_chosen_logps)
        rejected = beta * (policy_rejected_logps - ref_rejected_logps)
        return {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
            "logps/chosen": policy_chosen_logps.mean(),
            "logps/rejected": policy_rejected_logps.mean(),
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
    """Mean over pairs of :func:`dpo_per_pair_losses`, plus TRL's metrics."""
    losses = dpo_per_pair_losses(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type,
        label_smoothing,
    )
    metrics = dpo_metrics(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    return losses.mean(), metrics


def pair_dpo_loss(
    und: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    gen: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    beta: float = 0.2,
    und_coeff: float = 1.0,
    gen_coeff: float = 1.0,
    loss_type: str = "sigmoid",
) -> torch.Tensor:
    """HermesFlow's objective, per pair: mean_b [c_und·ℓ_und,b + c_gen·ℓ_gen,b]."""
    lu = dpo_per_pair_losses(*und, beta=beta, loss_type=loss_type)
    lg = dpo_per_pair_losses(*gen, beta=beta, loss_type=loss_type)
    return (und_coeff * lu + gen_coeff * lg).mean()


# ---------------------------------------------------------------------------------------------------------------------
# Linear head + DPO, liger's calling convention (chosen rows stacked over rejected rows), fully materialized
# ---------------------------------------------------------------------------------------------------------------------


def sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    average_log_prob: bool,
) -> torch.Tensor:
    """(S, T, H) -> (S,) sum (or mean) over the non-ignored tokens of each sequence."""
    return _sequence_logps(_logits(hidden, weight, bias), targets, ignore_index, average_log_prob)[0]


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(dtype) @ weight.to(dtype).t()  # (S, T, V)
    return logits if bias is None else logits + bias.to(dtype)


def _sequence_logps(logits, targets, ignore_index, average):
    keep = targets != ignore_index
    safe = torch.where(keep, targets, torch.zeros_like(targets))
    tok = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1) * keep  # (S, T)
    total = tok.sum(-1)
    return (total / keep.sum(-1).clamp_min(1) if average else total), tok


def fused_linear_dpo(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    average_log_prob: bool = False,
    compute_nll_loss: bool = False,
    alpha: float = 1.0,
    loss_scale: float = 1.0,
    cdpo: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The naive twin of ``FusedLinearDPOLoss``: HermesFlow's path (materialized logits + log_softmax + gather).

    hidden (2B, T, H): chosen rows [0, B) over rejected rows [B, 2B); targets (2B, T). The policy logits are built
    once, in full, and kept for backward; the reference's under no_grad. No ``ref_hidden``: reference-free.
    Returns (loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
    chosen_rewards, rejected_rewards)), the tuple liger-kernel returns.
    The losses are liger-kernel's: ``label_smoothing`` is read by robust and exo_pair only, and by sigmoid (cDPO,
    TRL's) only with ``cdpo=True``. IPO uses per-token averaged log-probs (as TRL does), whatever
    ``average_log_prob`` says. ``loss_scale`` multiplies the returned loss (the aux tuple is unscaled), as the fused
    op's argument of that name.
    """
    n = hidden.shape[0] // 2
    average = average_log_prob or loss_type == "ipo"
    logits = _logits(hidden, weight, bias)  # (2B, T, V)
    logps, tok = _sequence_logps(logits, targets, ignore_index, average)
    if ref_hidden is not None:
        with torch.no_grad():
            rw = weight if ref_weight is None else ref_weight
            ref = _sequence_logps(_logits(ref_hidden, rw, ref_bias), targets, ignore_index, average)[0]
    else:
        ref = torch.zeros_like(logps)
    eps = label_smoothing if loss_type in ("robust", "exo_pair") or (loss_type == "sigmoid" and cdpo) else 0.0
    loss = dpo_per_pair_losses(logps[:n], logps[n:], ref[:n], ref[n:], beta, loss_type, eps, discopop_tau).mean()
    denom = n * hidden.shape[1] * weight.shape[0]
    nll = -tok[:n].sum() / (targets[:n] != ignore_index).sum().clamp_min(1)
    if compute_nll_loss:
        loss = loss + alpha * nll
    with torch.no_grad():
        aux = (
            logps[:n].detach(),
            logps[n:].detach(),
            logits[:n].sum() / denom,
            logits[n:].sum() / denom,
            nll.detach() if compute_nll_loss else torch.zeros((), dtype=logits.dtype, device=hidden.device),
            beta * (logps[:n] - ref[:n]),
            beta * (logps[n:] - ref[n:]),
        )
    return loss * loss_scale, aux


# ---------------------------------------------------------------------------------------------------------------------
# Nearest code (VQ): chunked over rows, never the full (N, K) distance matrix
# ---------------------------------------------------------------------------------------------------------------------

NEAREST_CODE_CHUNK_ELEMENTS = 1 << 22  # scores per chunk by default: 16 MB of float32


def nearest_code(x: torch.Tensor, codebook: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """Index of the nearest code of each row: ``argmin_k ||c_k||² − 2 ⟨x_n, c_k⟩``, the lowest k on ties.

    The score drops ||x_n||², which is the same for every k of a row, so its argmin is the argmin of the squared L2
    distance ||x_n − c_k||². Every path (this one and the C++/CUDA kernels of ``ops.nearest_code``) computes this
    same score, in float32 for float32/float16/bfloat16 inputs and in float64 for float64: the norms ||c_k||² once,
    then ``norm − 2 · dot`` per (row, code). Where the scores are exact (e.g. integer-valued inputs of moderate size)
    all paths agree index for index, ties included; otherwise they can differ only between codes whose scores lie
    within rounding of each other (the dot products are summed in a different order).

    Ties go to the lowest index (``torch.argmin`` returns the first minimum). A NaN score counts as the minimum, as in
    ``torch.argmin``: a row with NaN in it gets 0, a code with NaN in it wins every row that has no earlier NaN.

    x (N, D), codebook (K, D), K ≥ 1, same floating dtype and device -> (N,) int64 on x's device.
    ``chunk_rows`` rows are scored at a time, (chunk_rows, K) scores held at once; by default as many rows as keep a
    chunk at about 4M scores.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    c = codebook.to(dtype)
    norms = (c * c).sum(1)  # (K,)
    if chunk_rows is None:
        chunk_rows = max(1, NEAREST_CODE_CHUNK_ELEMENTS // max(1, c.shape[0]))
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for start in range(0, x.shape[0], chunk_rows):
        xs = x[start : start + chunk_rows].to(dtype)  # (n, D)
        scores = norms - 2 * (xs @ c.t())  # (n, K)
        out[start : start + chunk_rows] = scores.argmin(1)
    return out
