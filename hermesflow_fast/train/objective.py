"""Pair-DPO on one packed micro-batch: one backbone forward, the fused head on target rows only, per-pair losses.

For a micro-batch holding pairs b (some may lack a side), with s ∈ {und, gen}:

    ℓ_s,b = DPO(logπθ(w) − logπref(w), logπθ(l) − logπref(l))           sums of token log-probs per sequence
    L     = Σ_s c_s · Σ_b ℓ_s,b / P_step                                  P_step: pairs of the whole optimizer step

so the gradient of a step is the same however its pairs are split into micro-batches and ranks (DDP averages
gradients over ranks: multiply by the world size). Each side is one ``fused_linear_dpo_loss`` call with the policy
and the reference rows together: und = next-token caption rows, gen = masked image slots (the same mask for chosen
and rejected). The reference is either the frozen model's hidden states at the same rows or log-probs precomputed
once per pair.

    python -m pytest -q tests/train/test_objective.py
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hermesflow_fast.model.layout import IGNORE_INDEX, Target
from hermesflow_fast.ops import fused_linear_dpo_loss

__all__ = ["SIDES", "PairDPOObjective", "SideRows", "gather_side", "side_stats_names"]

SIDES = ("und", "gen")
_STATS = ("count", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
          "logps/chosen", "logps/rejected")


def side_stats_names() -> list[str]:
    return [f"{s}/{k}" for s in SIDES for k in _STATS]


@dataclass
class SideRows:
    """One side of a micro-batch: which pairs have it and the target rows of chosen over rejected."""

    pairs: Tensor  # (Q,) int64 indices into the micro-batch's pair list
    rows: Tensor  # (2Q, L) int64 into the flattened (B·T) positions; chosen [0, Q), rejected [Q, 2Q)
    labels: Tensor  # (2Q, L) int64, IGNORE_INDEX padding
    extra: dict = field(default_factory=dict)


def _side_targets(chosen: Target, rejected: Target, pairs: Tensor, num_pairs: int) -> SideRows:
    """Stack chosen over rejected; a Target with one row per pair of the micro-batch is cut to the side's pairs."""
    rc, yc, rr, yr = chosen.rows, chosen.labels, rejected.rows, rejected.labels
    if rc.shape[0] == num_pairs and pairs.numel() != num_pairs:
        rc, yc, rr, yr = rc[pairs], yc[pairs], rr[pairs], yr[pairs]
    L = max(rc.shape[1], rr.shape[1])

    def pad(t: Tensor, value: int) -> Tensor:
        return torch.nn.functional.pad(t, (0, L - t.shape[1]), value=value)

    rows = torch.cat([pad(rc, 0), pad(rr, 0)])
    labels = torch.cat([pad(yc, IGNORE_INDEX), pad(yr, IGNORE_INDEX)])
    return SideRows(pairs, rows, labels)


def gather_side(batch, side: str) -> SideRows | None:
    """The target rows of ``side`` in a PackedBatch (None when no pair of the batch has that side)."""
    pairs = getattr(batch, f"{side}_pairs")
    pairs = torch.as_tensor(pairs, dtype=torch.long)
    if pairs.numel() == 0:
        return None
    t = batch.targets
    return _side_targets(t[f"{side}_chosen"], t[f"{side}_rejected"], pairs, len(batch.pair_ids))


def _rows(hidden: Tensor, rows: Tensor) -> Tensor:
    """hidden (B, T, d) at flat positions rows (N, L) → (N, L, d)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    return flat.index_select(0, rows.reshape(-1).to(flat.device)).view(*rows.shape, -1)


class PairDPOObjective(nn.Module):
    """The module DDP/FSDP wrap: policy backbone + head + Pair-DPO, so every parameter is used inside forward."""

    def __init__(self, policy: nn.Module, beta: float = 0.2, loss_type: str = "sigmoid", und_coeff: float = 1.0,
                 gen_coeff: float = 1.0, label_smoothing: float = 0.0):
        super().__init__()
        self.policy = policy
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.coeff = {"und": und_coeff, "gen": gen_coeff}

    def forward(self, batch, ref: tuple[Tensor, Tensor, Tensor | None] | None = None,
                ref_logps: dict[str, tuple[Tensor, Tensor]] | None = None, scale: float = 1.0
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """→ (loss to backward, summed stats). ``scale`` = world_size / P_step. The reference is ``ref`` = (hidden
        (B, T, d) of the frozen model on the same batch, its head weight, its head bias), or ``ref_logps[side] =
        (chosen (Q,), rejected (Q,))`` precomputed; with neither the loss is reference-free."""
        policy = self.policy
        hidden = policy(batch.input_ids, batch.mask, batch.position_ids)  # (B, T, d)
        W, b = policy.lm_head.weight, policy.lm_head.bias
        total = hidden.new_zeros((), dtype=torch.float32)
        stats: dict[str, Tensor] = {}
        for side in SIDES:
            sr = gather_side(batch, side)
            zero = torch.zeros((), dtype=torch.float64, device=hidden.device)
            for k in _STATS:
                stats[f"{side}/{k}"] = zero
            if sr is None:
                continue
            Q = sr.pairs.numel()
            x = _rows(hidden, sr.rows)
            y = sr.labels.to(hidden.device)
            kw = {}
            if ref_logps is not None:
                kw = {"ref_chosen_logps": ref_logps[side][0], "ref_rejected_logps": ref_logps[side][1]}
            elif ref is not None:
                kw = {"ref_hidden": _rows(ref[0], sr.rows), "ref_weight": ref[1], "ref_bias": ref[2]}
            # the step's weight of this side's mean goes into the op (loss_scale): its forward-computed gradients
            # come out already scaled, and backward passes them through untouched
            weight = self.coeff[side] * Q * scale
            fold = weight != 0
            scaled, aux = fused_linear_dpo_loss(x, W, y, b, beta=self.beta, loss_type=self.loss_type,
                                                label_smoothing=self.label_smoothing, cdpo=True,
                                                loss_scale=weight if fold else 1.0, **kw)
            total = total + (scaled if fold else 0.0 * scaled)
            loss = scaled / weight if fold else scaled
            pc, pr, _, _, _, rc, rr = aux
            d = lambda t: t.detach().double().sum()  # noqa: E731
            stats.update({
                f"{side}/count": torch.tensor(float(Q), dtype=torch.float64, device=hidden.device),
                f"{side}/loss": loss.detach().double() * Q,
                f"{side}/rewards/chosen": d(rc), f"{side}/rewards/rejected": d(rr),
                f"{side}/rewards/margins": d(rc - rr), f"{side}/rewards/accuracies": d((rc > rr).float()),
                f"{side}/logps/chosen": d(pc), f"{side}/logps/rejected": d(pr),
            })
        return total, stats


@torch.no_grad()
def reference_logps(reference: nn.Module, batch) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-pair reference sequence log-probs of each side of a micro-batch: (chosen (Q,), rejected (Q,))."""
    from hermesflow_fast.ops import linear_logprobs

    hidden = reference(batch.input_ids, batch.mask, batch.position_ids)
    out = {}
    for side in SIDES:
        sr = gather_side(batch, side)
        if sr is None:
            continue
        lp = linear_logprobs(_rows(hidden, sr.rows), reference.lm_head.weight, sr.labels.to(hidden.device),
                             reference.lm_head.bias).double().sum(-1)
        Q = sr.pairs.numel()
        out[side] = (lp[:Q].float(), lp[Q:].float())
    return out
