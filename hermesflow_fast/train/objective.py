"""Pair-DPO on one packed micro-batch: one backbone forward, the fused head on target rows only, per-pair losses.

For a micro-batch holding pairs b (some may lack a side), with s ∈ {und, gen}:

    ℓ_s,b = DPO(logπθ(w) − logπref(w), logπθ(l) − logπref(l)) + α · NLL_s,b(w)
    L     = Σ_s c_s · Σ_b ℓ_s,b / P_step                                  P_step: pairs of the whole optimizer step

so the gradient of a step is the same however its pairs are split into micro-batches and ranks (DDP averages
gradients over ranks: multiply by the world size). A sequence's log-prob is a weighted sum of its token log-probs,
logπ = Σ_t w_t log p_t:

    und               w_t = 1                                         the caption's tokens
    gen, M masks      w_t = 1/M                 (gen_logp "sum")      the mean over the pair's masks of the sum
                      w_t = 1/(M · k_m)         (gen_logp "mean")     over each mask's k_m masked slots, or of
                                                                      their mean; M = 1, "sum" is Show-o's one draw
    NLL_s,b(w) = −Σ_t w_t log p_t / Σ_t w_t   over the chosen sequence: its NLL per token (α = ``rpo_alpha``)

(IPO scores per-token means, as TRL: the weights are then normalised to sum to 1 per sequence.) Chosen and rejected
share every mask, and so do the policy and the reference. With all weights 1 and α = 0 (the defaults) a side is one
``fused_linear_dpo_loss`` call with the policy and the reference rows together (und = next-token caption rows, gen =
masked image slots); otherwise ``linear_logprobs`` gives the token log-probs (the op's "twopass" path: no
[tokens × V] logits either) and the weighted sums feed ``pair_dpo_loss``. The reference is either the frozen model's
hidden states at the same rows or log-probs precomputed once per pair (``reference_logps``, same weights).

    python -m pytest -q tests/train/test_objective.py
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hermesflow_fast.model.layout import IGNORE_INDEX, Target
from hermesflow_fast.ops import fused_linear_dpo_loss, linear_logprobs, pair_dpo_loss

__all__ = ["GEN_LOGP", "SIDES", "PairDPOObjective", "SideRows", "gather_side", "label_weights", "reference_logps",
           "side_stats_names"]

SIDES = ("und", "gen")
GEN_LOGP = ("sum", "mean")
_STATS = ("count", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
          "logps/chosen", "logps/rejected", "nll")
_READS_SMOOTHING = ("sigmoid", "robust", "exo_pair")  # the trainer's sigmoid is conservative DPO (cdpo)


def side_stats_names() -> list[str]:
    return [f"{s}/{k}" for s in SIDES for k in _STATS]


@dataclass
class SideRows:
    """One side of a micro-batch: which pairs have it and the target rows of chosen over rejected."""

    pairs: Tensor  # (Q,) int64 indices into the micro-batch's pair list
    rows: Tensor  # (2Q, L) int64 into the flattened (B·T) positions; chosen [0, Q), rejected [Q, 2Q)
    labels: Tensor  # (2Q, L) int64, IGNORE_INDEX padding
    extra: dict = field(default_factory=dict)
    group: Tensor | None = None  # (2Q, L) int64 mask of each label (−1 padding); None: one mask per sequence


def _side_targets(chosen: Target, rejected: Target, pairs: Tensor, num_pairs: int) -> SideRows:
    """Stack chosen over rejected; a Target with one row per pair of the micro-batch is cut to the side's pairs."""
    rc, yc, rr, yr = chosen.rows, chosen.labels, rejected.rows, rejected.labels
    gc, gr = chosen.group, rejected.group
    cut = rc.shape[0] == num_pairs and pairs.numel() != num_pairs
    if cut:
        rc, yc, rr, yr = rc[pairs], yc[pairs], rr[pairs], yr[pairs]
    L = max(rc.shape[1], rr.shape[1])

    def pad(t: Tensor, value: int) -> Tensor:
        return torch.nn.functional.pad(t, (0, L - t.shape[1]), value=value)

    rows = torch.cat([pad(rc, 0), pad(rr, 0)])
    labels = torch.cat([pad(yc, IGNORE_INDEX), pad(yr, IGNORE_INDEX)])
    group = None
    if gc is not None and gr is not None:
        if cut:
            gc, gr = gc[pairs], gr[pairs]
        group = torch.cat([pad(gc, -1), pad(gr, -1)])
    return SideRows(pairs, rows, labels, group=group)


def gather_side(batch, side: str) -> SideRows | None:
    """The target rows of ``side`` in a PackedBatch (None when no pair of the batch has that side)."""
    pairs = getattr(batch, f"{side}_pairs")
    pairs = torch.as_tensor(pairs, dtype=torch.long)
    if pairs.numel() == 0:
        return None
    t = batch.targets
    return _side_targets(t[f"{side}_chosen"], t[f"{side}_rejected"], pairs, len(batch.pair_ids))


def label_weights(labels: Tensor, group: Tensor | None = None, per_slot: bool = False, normalize: bool = False
                  ) -> Tensor:
    """(S, L) float64 weight of each label in its sequence's log-prob (0 at IGNORE_INDEX): 1/M over a row's M mask
    groups (``group`` (S, L), None = one), divided by the group's label count with ``per_slot``, rescaled to sum 1
    per row with ``normalize``."""
    keep = labels != IGNORE_INDEX  # (S, L)
    g = torch.zeros_like(labels) if group is None else group.clamp_min(0).to(labels.device)
    g = torch.where(keep, g, torch.zeros_like(g))
    groups = int(g.max()) + 1 if g.numel() else 1
    counts = torch.zeros(labels.shape[0], groups, dtype=torch.float64, device=labels.device)
    counts.scatter_add_(1, g, keep.double())  # (S, G) labels per mask
    masks = (counts > 0).sum(1, keepdim=True).clamp_min(1)  # (S, 1)
    w = keep.double() / masks
    if per_slot:
        w = w / counts.gather(1, g).clamp_min(1)
    if normalize:
        w = w / w.sum(1, keepdim=True).clamp_min(1e-300)
    return w


def _rows(hidden: Tensor, rows: Tensor) -> Tensor:
    """hidden (B, T, d) at flat positions rows (N, L) → (N, L, d)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    return flat.index_select(0, rows.reshape(-1).to(flat.device)).view(*rows.shape, -1)


class PairDPOObjective(nn.Module):
    """The module DDP/FSDP wrap: policy backbone + head + Pair-DPO, so every parameter is used inside forward."""

    def __init__(self, policy: nn.Module, beta: float = 0.2, loss_type: str = "sigmoid", und_coeff: float = 1.0,
                 gen_coeff: float = 1.0, label_smoothing: float = 0.0, gen_logp: str = "sum",
                 rpo_alpha: float = 0.0):
        super().__init__()
        if gen_logp not in GEN_LOGP:
            raise ValueError(f"gen_logp must be one of {GEN_LOGP}, got {gen_logp!r}")
        if not rpo_alpha >= 0:
            raise ValueError(f"rpo_alpha must be ≥ 0, got {rpo_alpha}")
        self.policy = policy
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.coeff = {"und": und_coeff, "gen": gen_coeff}
        self.gen_logp, self.rpo_alpha = gen_logp, float(rpo_alpha)

    def weights(self, side: str, sr: SideRows) -> Tensor | None:
        """(2Q, L) label weights of ``side`` (``label_weights``), or None when every weight is 1 and α = 0."""
        per_slot = side == "gen" and self.gen_logp == "mean"
        if sr.group is None and not per_slot and not self.rpo_alpha:
            return None
        return label_weights(sr.labels, sr.group, per_slot, self.loss_type == "ipo")

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
            weight = self.coeff[side] * Q * scale  # the step's weight of this side's mean over its Q pairs
            w = self.weights(side, sr)
            if w is None:
                loss, (pc, pr, rc, rr), part = self._fused(side, x, W, b, y, sr, ref, ref_logps, weight)
                per_token = self.loss_type == "ipo"  # IPO's log-probs are already per-token means
                nll = -pc.double() / (1 if per_token else (y[:Q] != IGNORE_INDEX).sum(1).clamp_min(1))
            else:
                loss, (pc, pr, rc, rr), nll, part = self._weighted(side, x, W, b, y, w.to(hidden.device), sr, ref,
                                                                   ref_logps, weight)
            total = total + part
            d = lambda t: t.detach().double().sum()  # noqa: E731
            stats.update({
                f"{side}/count": torch.tensor(float(Q), dtype=torch.float64, device=hidden.device),
                f"{side}/loss": loss.detach().double() * Q,
                f"{side}/rewards/chosen": d(rc), f"{side}/rewards/rejected": d(rr),
                f"{side}/rewards/margins": d(rc - rr), f"{side}/rewards/accuracies": d((rc > rr).float()),
                f"{side}/logps/chosen": d(pc), f"{side}/logps/rejected": d(pr), f"{side}/nll": d(nll),
            })
        return total, stats

    def _fused(self, side, x, W, b, y, sr, ref, ref_logps, weight):
        """Plain sums, no NLL term: one fused head + DPO call. → (mean loss, (pc, pr, chosen and rejected rewards),
        the part of the micro-batch loss to backward)."""
        kw = {}
        if ref_logps is not None:
            kw = {"ref_chosen_logps": ref_logps[side][0], "ref_rejected_logps": ref_logps[side][1]}
        elif ref is not None:
            kw = {"ref_hidden": _rows(ref[0], sr.rows), "ref_weight": ref[1], "ref_bias": ref[2]}
        # the step's weight goes into the op (loss_scale): its forward-computed gradients come out already scaled,
        # and backward passes them through untouched
        fold = weight != 0
        scaled, aux = fused_linear_dpo_loss(x, W, y, b, beta=self.beta, loss_type=self.loss_type,
                                            label_smoothing=self.label_smoothing, cdpo=True,
                                            loss_scale=weight if fold else 1.0, **kw)
        pc, pr, _, _, _, rc, rr = aux
        return (scaled / weight if fold else scaled), (pc, pr, rc, rr), (scaled if fold else 0.0 * scaled)

    def _weighted(self, side, x, W, b, y, w, sr, ref, ref_logps, weight):
        """Weighted log-probs (+ α · NLL per token of the chosen): token log-probs, then DPO per pair. → (mean loss,
        (pc, pr, rewards), per-pair NLL (Q,), the part to backward: ``weight`` × the mean over the Q pairs)."""
        Q = sr.pairs.numel()
        tok = linear_logprobs(x, W, y, b).double()  # (2Q, L), 0 at padding
        lp = (tok * w).sum(-1)  # (2Q,)
        if ref_logps is not None:
            rlp = torch.cat([ref_logps[side][0], ref_logps[side][1]]).to(lp)
        elif ref is not None:
            with torch.no_grad():
                rlp = (linear_logprobs(_rows(ref[0], sr.rows), ref[1], y, ref[2]).double() * w).sum(-1)
        else:
            rlp = torch.zeros_like(lp)
        eps = self.label_smoothing if self.loss_type in _READS_SMOOTHING else 0.0
        # this side's Pair-DPO term, mean over its Q pairs (the step's weight of that mean, c_side included: weight)
        logps = (lp[:Q], lp[Q:], rlp[:Q], rlp[Q:])
        dpo, _ = pair_dpo_loss(logps if side == "und" else None, logps if side == "gen" else None, beta=self.beta,
                               loss_type=self.loss_type, label_smoothing=eps)
        nll = -(tok[:Q] * w[:Q]).sum(-1) / w[:Q].sum(-1).clamp_min(1e-300)  # (Q,) per token
        mean = dpo + self.rpo_alpha * nll.mean()
        part = (weight * mean).float()
        with torch.no_grad():
            rewards = (self.beta * (lp[:Q] - rlp[:Q]), self.beta * (lp[Q:] - rlp[Q:]))
        return mean.detach(), (lp[:Q].detach(), lp[Q:].detach(), *rewards), nll.detach(), part


@torch.no_grad()
def reference_logps(reference: nn.Module, batch, gen_logp: str = "sum", loss_type: str = "sigmoid"
                    ) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-pair reference sequence log-probs of each side of a micro-batch: (chosen (Q,), rejected (Q,)), weighted
    as ``PairDPOObjective(gen_logp=…, loss_type=…)`` weighs the policy's (per-token means for IPO)."""
    hidden = reference(batch.input_ids, batch.mask, batch.position_ids)
    out = {}
    for side in SIDES:
        sr = gather_side(batch, side)
        if sr is None:
            continue
        y = sr.labels.to(hidden.device)
        tok = linear_logprobs(_rows(hidden, sr.rows), reference.lm_head.weight, y, reference.lm_head.bias).double()
        per_slot = side == "gen" and gen_logp == "mean"
        if sr.group is None and not per_slot and loss_type != "ipo":
            lp = tok.sum(-1)
        else:
            lp = (tok * label_weights(y, sr.group, per_slot, loss_type == "ipo")).sum(-1)
        Q = sr.pairs.numel()
        out[side] = (lp[:Q].float(), lp[Q:].float())
    return out
