"""Fused linear head + DPO loss: policy and reference in one call, loss and gradients out, no logits materialized.

A drop-in for liger-kernel's fused DPO (0.8.5) in each of its three forms, same arguments in the same order:

    FusedLinearDPOLoss(ignore_index, beta, alpha, compute_nll_loss, compiled, use_ref_model, average_log_prob,
                       chunk_size, loss_type, label_smoothing, discopop_tau)                  LigerFusedLinearDPOLoss
        (lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias)
    fused_linear_dpo_loss(_input, weight, target, bias, ref_input, ref_weight, ref_bias, ignore_index, beta,
                          compute_nll_loss, compiled, use_ref_model, average_log_prob, chunk_size, loss_type,
                          label_smoothing, discopop_tau, alpha)                               liger_fused_linear_dpo
    FusedLinearDPOFunction.apply(the same 18, by position)                   LigerFusedLinearDPOFunction.apply

each returning (loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
chosen_rewards, rejected_rewards)). Hidden states (2B, T, H): the chosen sequences stacked over the rejected ones;
targets (2B, T) already shifted, ``ignore_index`` where nothing is scored.

    logp_s = Σ_t∈s log softmax(x_t Wᵀ + b)[y_t]      (the mean over s's tokens if average_log_prob, or for IPO)
    a_b = logp_b^w − ref_b^w,  r_b = logp_b^l − ref_b^l,  z_b = β (a_b − r_b)     (ref = 0 without a reference)
    loss = mean_b ℓ(a_b, r_b) [+ α · mean NLL of the chosen tokens], ℓ as liger defines it (ε = label_smoothing):
      sigmoid   −logσ(z)                     hinge     max(0, 1 − z)
      robust    (−(1−ε) logσ(z) + ε logσ(−z)) / (1 − 2ε)
      exo_pair  σ(z)(logσ(z) − log(1−ε)) + σ(−z)(logσ(−z) − log ε)
      bco_pair  −logσ(βa) − logσ(−βr)        nca_pair  −logσ(βa) − ½ logσ(−βa) − ½ logσ(−βr)
      sppo_hard (a − 1/2β)² + (r + 1/2β)²    apo_zero  1 − σ(βa) + σ(βr)      apo_down  σ(βa) + 1 − σ(z)
      discopop  −logσ(z)·(1 − σ(z/τ)) + e^(−z)·σ(z/τ)
    and beyond liger: ipo (a − r − 1/2β)² on per-token mean log-probs, as TRL.

Where this op departs from liger-kernel on purpose (each stated once per process as a UserWarning where it changes
a number, see :func:`check_fused_dpo_options`):
  - ``cdpo=True`` (off by default) applies ε to ``sigmoid`` as conservative DPO, −(1−ε) logσ(z) − ε logσ(−z), which
    is TRL's DPOTrainer's sigmoid loss; liger ignores ε there. The default is liger's, so that code moved from liger
    gets liger's numbers; a nonzero ε that the chosen loss type ignores is said once too.
  - ``ipo`` works (liger raises); IPO averages log-probs per token whatever ``average_log_prob`` says, as TRL.
  - ``chunk_size`` (pairs per chunk) defaults to None: chunks sized by memory (below); liger's default is 1 pair.
    ``compiled`` is accepted and ignored (nothing here needs torch.compile).
  - ``use_ref_model`` without ``ref_input`` is reference-free and ``ref_weight`` defaults to ``weight`` (liger fails
    on both); a sequence with no scored token has log-prob 0 under ``average_log_prob`` (liger: 0/0 = nan).
  - dW and db are accumulated over chunks in fp32 (liger: in the weight's dtype), so bf16 gradients agree with
    liger's to bf16 rounding, not bit for bit.
Keyword-only extras: ``cdpo``, precomputed reference log-probs (``ref_chosen_logps``, ``ref_rejected_logps``),
``loss_scale``, ``backend``, ``chunk_bytes``.

"auto" picks "twopass" on CUDA when Triton is there (measured on an H100 in bf16, bench/results/logprobs_gpu.csv:
1.42–1.78× the four-GEMM floor and 467–587 MB extra against "chunked"'s 1.86–2.25× and 787–1,132 MB, 1k–16k
tokens) and "chunked" everywhere else (on CPU it is the faster one, bench/results/logprobs.csv).
Those twopass numbers predate the Triton backward's dw_mode="owned" (kernels/linear_logprobs.py), now its default
for 16-bit inputs: no fp32 (V, H) dW buffer, modelled backward extra ≤ 0.18× inputs + gradients (107 MB instead of
614 MB at 16,384 tokens, H 2048, V 58,498), one more GEMM from ~9.6k tokens up; the benchmark's
``ours_twopass_atomic`` provider runs the former backward beside it.
:class:`FusedLinearDPOFunction` always runs "chunked" (gradients in forward, as liger's Function).

The "chunked" path computes gradients during the forward pass, one chunk of whole pairs at a time:
    1. reference: one GEMM per row chunk, only the logsumexp and target logit survive (no grad);
    2. per chunk of pairs: z = x Wᵀ + b (GEMM), per-token logp, the pairs' sequence log-probs, the pairs' loss and
       ∂loss/∂logp_s (a tiny autograd call, so every loss type is supported exactly); then in place
       dz = c_t (onehot − softmax(z)) and dx = dz W, dW += dzᵀ x (two GEMMs, fp32 accumulation).
   Three policy GEMMs + one reference GEMM, which is the floor of any exact method, and one chunk of logits alive.
   Rows whose target is ``ignore_index`` never reach a GEMM. ``backward`` only scales the saved gradients.
   A chunk holds whole pairs, at most ``chunk_size`` of them, or at most ``chunk_bytes`` of fp32 logits, or by
   default a quarter of the policy's scored rows (at least 512 rows, see ``logprobs.default_chunk_rows``), so its
   logits stay under 1/8 of what the naive path holds from 2048 tokens up; a pair larger than that is one chunk.
The "twopass" path composes :func:`linear_logprobs` (Triton on CUDA) with the DPO loss under autograd: one
extra GEMM (logits recomputed in backward), no chunk larger than a tile on CUDA.

    python -m pytest -q tests/ops/test_fused_dpo.py tests/ops/test_fused_dpo_liger.py
    hermesflow bench logprobs --tokens 4096        # vs naive, TRL, liger, torch chunked
"""

from __future__ import annotations

import math
import warnings

import torch

from hermesflow_fast.ops._checks import autocast_cast, autocast_off, check_linear_head
from hermesflow_fast.ops.dpo import check_dpo_options, dpo_losses
from hermesflow_fast.ops.logprobs import (
    acc_dtype,
    accumulate_head_grads,
    chunk_rows_for,
    chunked_token_logprobs,
    grad_from_exp_,
    linear_logprobs,
    logits_buffer,
    logits_stats_,
)
from hermesflow_fast.ops.logprobs import resolve_backend as resolve_logprobs_backend

__all__ = ["LIGER_LOSS_TYPES", "FusedLinearDPOFunction", "FusedLinearDPOLoss", "check_fused_dpo_options",
           "fused_linear_dpo_loss"]

_BACKENDS = ("auto", "chunked", "twopass")
LIGER_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "discopop",
)  # what liger-kernel 0.8.5's DPO accepts; every one of DPO_LOSS_TYPES (these and ipo) works here

# ---------------------------------------------------------------------------------------------------------------------
# options: validation and the one-time notices
# ---------------------------------------------------------------------------------------------------------------------


def _reads_smoothing(loss_type: str, cdpo: bool) -> bool:
    return loss_type in ("robust", "exo_pair") or (loss_type == "sigmoid" and cdpo)


_said: set[tuple[str, str]] = set()


def _notice(loss_type: str, label_smoothing: float, cdpo: bool, stacklevel: int) -> None:
    """Once per process and case, a UserWarning where ε changes nothing or changes liger's number."""
    if not label_smoothing or loss_type in ("robust", "exo_pair"):
        return
    if loss_type == "sigmoid" and cdpo:
        key = ("cdpo", loss_type)
        msg = (f"fused DPO: cdpo=True makes loss_type='sigmoid' with label_smoothing={label_smoothing} conservative "
               "DPO, -(1-ε)·logσ(z) - ε·logσ(-z), as TRL's DPOTrainer; liger-kernel's LigerFusedLinearDPOLoss ignores "
               "label_smoothing for 'sigmoid', so this loss differs from liger's for the same arguments")
    else:
        key = ("ignored", loss_type)
        hint = (": liger-kernel's definition, which this op follows; pass cdpo=True for conservative DPO (TRL's "
                "sigmoid loss) or use loss_type='robust'") if loss_type == "sigmoid" else \
            " (only 'robust', 'exo_pair' and, with cdpo=True, 'sigmoid' use it)"
        msg = f"fused DPO: label_smoothing={label_smoothing} has no effect with loss_type={loss_type!r}{hint}"
    if key not in _said:
        _said.add(key)
        warnings.warn(msg, UserWarning, stacklevel=stacklevel + 1)


def check_fused_dpo_options(
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
    cdpo: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
    stacklevel: int = 2,
) -> None:
    """Raise ``ValueError`` for options the op cannot take; warn once per process where ε is ignored or where
    ``cdpo=True`` makes the loss differ from liger-kernel's. ε is range-checked only where it is used: robust
    [0, 0.5), exo_pair (0, 1), sigmoid with cdpo [0, 0.5]; elsewhere any finite number is accepted, as liger does."""
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or not math.isfinite(
            label_smoothing):
        raise ValueError(f"label_smoothing must be a finite number, got {label_smoothing!r}")
    check_dpo_options(beta, loss_type, label_smoothing if _reads_smoothing(loss_type, cdpo) else 0.0)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None (chunks sized by memory) or pairs per chunk >= 1: {chunk_size!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {_BACKENDS}")
    _notice(loss_type, float(label_smoothing), cdpo, stacklevel + 1)


def _loss_options(beta, loss_type, label_smoothing, discopop_tau, cdpo) -> dict:
    eps = float(label_smoothing) if _reads_smoothing(loss_type, cdpo) else 0.0
    return {"beta": float(beta), "loss_type": loss_type, "label_smoothing": eps, "discopop_tau": float(discopop_tau)}


# ---------------------------------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------------------------------


def _logits_mean(x: torch.Tensor, w_sum: torch.Tensor, b_sum: torch.Tensor | None, v: int) -> torch.Tensor:
    """Mean of every logit of x (S, T, H) over all S·T rows and V columns, without the logits: x̄·ΣW + Σb
    (``w_sum`` = ΣW over the vocabulary (H,), ``b_sum`` = Σb, both in the accumulation dtype)."""
    s, t = x.shape[0], x.shape[1]
    with torch.no_grad():
        total = x.sum((0, 1), dtype=w_sum.dtype) @ w_sum
        if b_sum is not None:
            total = total + s * t * b_sum
        return total / max(1, s * t * v)


def _seq_logps(tok: torch.Tensor, seq: torch.Tensor, n_seq: int, counts: torch.Tensor | None) -> torch.Tensor:
    """Per-sequence sum (or mean) of token log-probs. index_add_ adds one value at a time, so it accumulates in
    float64: a 256-token sum of ~-11 nats drifts by ~3e-4 in fp32 (10x a pairwise sum), float64 keeps it exact."""
    out = torch.zeros(n_seq, dtype=torch.float64, device=tok.device).index_add_(0, seq, tok.double()).to(tok.dtype)
    return out / counts.clamp_min(1) if counts is not None else out


def _aux(x, weight, bias, logps, ref, nll, beta: float) -> tuple[torch.Tensor, ...]:
    """liger's aux tuple: (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
    chosen_rewards, rejected_rewards), detached; nll is None when the NLL term is off."""
    n = x.shape[0] // 2
    d = logps.detach()
    with torch.no_grad():  # one pass over the (V, H) head for both means
        acc = acc_dtype(x)
        w_sum = weight.sum(0, dtype=acc)
        b_sum = None if bias is None else bias.sum(dtype=acc)
    return (
        d[:n],
        d[n:],
        _logits_mean(x[:n], w_sum, b_sum, weight.shape[0]),
        _logits_mean(x[n:], w_sum, b_sum, weight.shape[0]),
        torch.zeros((), device=x.device) if nll is None else nll.detach(),
        beta * (d[:n] - ref[:n]),
        beta * (d[n:] - ref[n:]),
    )


def _ref_logps(ref_x, ref_w, ref_b, y, keep_idx, seq_of, n_seq, counts, rows, given, dtype, buf):
    """(2B,) reference sequence log-probs: given ones, the reference head, or zeros (no reference model)."""
    if given is not None:
        return given.to(dtype)
    if ref_x is None:
        return torch.zeros(n_seq, dtype=dtype, device=y.device)
    with torch.no_grad():
        flat = ref_x.reshape(-1, ref_x.shape[-1])
        tok, _ = chunked_token_logprobs(flat, ref_w, ref_b, y.index_select(0, keep_idx), rows, keep_idx, buf)
        return _seq_logps(tok, seq_of, n_seq, counts)


def _pair_chunks(counts: list[int], n: int, max_rows: int, pairs_per_chunk: int | None) -> list[tuple[int, int]]:
    """Greedy groups [p0, p1) of whole pairs: at most max_rows valid rows (or pairs_per_chunk pairs) each; a pair
    with more rows than max_rows is a chunk of its own."""
    chunks, p0, rows = [], 0, 0
    for p in range(n):
        r = counts[p] + counts[n + p]
        full = (p - p0 >= pairs_per_chunk) if pairs_per_chunk else (rows + r > max_rows)
        if p > p0 and full:
            chunks.append((p0, p))
            p0, rows = p, 0
        rows += r
    chunks.append((p0, n))
    return chunks


def _prepare(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, ignore_index, use_ref_model,
             ref_chosen_logps=None, ref_rejected_logps=None):
    """Validate the tensors and cast them as autocast would; the reference is detached. Returns (hidden, weight,
    bias, ref_hidden, ref_weight, ref_bias, ref_given) with ref_given the (2B,) precomputed reference or None."""
    op = "fused_linear_dpo_loss"
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[0] % 2:
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"{op}: hidden must have shape (2B, T, H), chosen over rejected, got {shape}")
    given = ref_chosen_logps is not None or ref_rejected_logps is not None
    if not use_ref_model:
        if given:
            raise ValueError(f"{op}: use_ref_model=False but ref_chosen_logps/ref_rejected_logps were given")
        ref_hidden = ref_weight = ref_bias = None
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias = autocast_cast(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    check_linear_head(op, hidden, weight, targets, bias, ignore_index)
    ref_given = None
    if given:
        if ref_chosen_logps is None or ref_rejected_logps is None or ref_hidden is not None:
            raise ValueError(f"{op}: pass both ref_chosen_logps and ref_rejected_logps, and no ref_hidden, or neither")
        ref_given = torch.cat([ref_chosen_logps, ref_rejected_logps]).to(hidden.device)
        if ref_given.shape != (hidden.shape[0],):
            raise ValueError(
                f"{op}: ref_chosen_logps/ref_rejected_logps must be ({hidden.shape[0] // 2},) each, got "
                f"{tuple(ref_chosen_logps.shape)} and {tuple(ref_rejected_logps.shape)}"
            )
    if ref_hidden is not None:
        ref_weight = weight if ref_weight is None else ref_weight
        if not isinstance(ref_hidden, torch.Tensor) or ref_hidden.shape[:2] != hidden.shape[:2]:
            shape = tuple(ref_hidden.shape) if isinstance(ref_hidden, torch.Tensor) else type(ref_hidden).__name__
            raise ValueError(
                f"{op}: ref_hidden has shape {shape}, expected (2B, T, H') with (2B, T) = {tuple(hidden.shape[:2])}"
            )
        check_linear_head(op, ref_hidden, ref_weight, targets, ref_bias, ignore_index,
                          "ref_hidden", "ref_weight", "ref_bias")
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
        ref_bias = None if ref_bias is None else ref_bias.detach()
    return hidden, weight, bias, ref_hidden, ref_weight, ref_bias, ref_given


def _options(ignore_index, beta, compute_nll_loss, average_log_prob, chunk_size, loss_type, label_smoothing,
             discopop_tau, alpha, cdpo, chunk_bytes, loss_scale, needs) -> dict:
    return {
        "ignore_index": ignore_index,
        "average": bool(average_log_prob) or loss_type == "ipo",
        "nll": bool(compute_nll_loss),
        "alpha": float(alpha),
        "chunk_bytes": chunk_bytes,
        "chunk_size": chunk_size,
        "loss_scale": float(loss_scale),
        "loss": _loss_options(beta, loss_type, label_smoothing, discopop_tau, cdpo),
        "needs": needs,
    }


def _chunked(x, weight, bias, y, ref_x, ref_w, ref_b, ref_given, opts: dict):
    """The "chunked" path: (loss, aux tuple, (grad_x, grad_w, grad_b)), gradients in the dtypes of x, weight, bias
    (None where not needed). Runs with autograd off except for the tiny per-chunk loss gradient."""
    s_seq, t_len, h = x.shape
    n = s_seq // 2
    need_x, need_w, need_b = opts["needs"]
    average = opts["average"]
    xf, yf = x.reshape(-1, h), y.reshape(-1).long()
    keep = yf != opts["ignore_index"]
    keep_idx = keep.nonzero().squeeze(1)  # (R,) valid rows, grouped by sequence
    seq_of = keep_idx // t_len
    counts = keep.view(s_seq, t_len).sum(1)  # (2B,)
    counts_list = counts.tolist()
    offsets = [0]
    for c in counts_list:
        offsets.append(offsets[-1] + c)
    avg_counts = counts if average else None
    rows = chunk_rows_for(keep_idx.numel(), weight.shape[0], x.device, opts["chunk_bytes"])
    chunks = _pair_chunks(counts_list, n, rows, opts["chunk_size"])
    # one logits buffer as large as the largest chunk of pairs, for the policy's chunks and the reference's
    buf_rows = max(1, max(offsets[p1] - offsets[p0] + offsets[n + p1] - offsets[n + p0] for p0, p1 in chunks))
    acc = acc_dtype(x)
    buf = logits_buffer(buf_rows, weight, x) if keep_idx.numel() else None
    same_head = ref_w is not None and ref_w.shape[0] == weight.shape[0] and ref_w.dtype == weight.dtype
    ref_buf = buf if same_head else None
    ref = _ref_logps(ref_x, ref_w, ref_b, yf, keep_idx, seq_of, s_seq, avg_counts, buf_rows, ref_given, acc, ref_buf)

    grad_x = torch.zeros_like(xf) if need_x else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
    logps = torch.zeros(s_seq, dtype=acc, device=x.device)
    loss = torch.zeros((), dtype=acc, device=x.device)
    nll = torch.zeros((), dtype=acc, device=x.device)
    n_chosen_tok = max(1, sum(counts_list[:n]))
    any_grad = need_x or need_w or need_b

    for p0, p1 in chunks:
        k = p1 - p0
        idx = torch.cat([keep_idx[offsets[p0] : offsets[p1]], keep_idx[offsets[n + p0] : offsets[n + p1]]])
        n_c = offsets[p1] - offsets[p0]  # chosen rows come first in idx
        seqs = torch.cat([torch.arange(p0, p1), torch.arange(n + p0, n + p1)]).to(x.device)
        local = torch.cat(  # sequence of each row inside the chunk: chosen 0..k-1, rejected k..2k-1
            [seq_of[offsets[p0] : offsets[p1]] - p0, seq_of[offsets[n + p0] : offsets[n + p1]] - n - p0 + k]
        )
        if idx.numel():
            xs = xf.index_select(0, idx)  # (r, H)
            y_c = yf.index_select(0, idx)
            # z: (r, V) fp32 exp(logits − rowmax), a view of the shared buffer
            z, lse, tgt, inv_sum = logits_stats_(xs, weight, bias, y_c, buf)
            tok = tgt - lse
            seq_lp = _seq_logps(tok, local, 2 * k, counts[seqs] if average else None)
        else:
            z = tok = None
            seq_lp = torch.zeros(2 * k, dtype=acc, device=x.device)
        logps[seqs] = seq_lp
        with torch.enable_grad():
            pc = seq_lp[:k].detach().requires_grad_(True)
            pr = seq_lp[k:].detach().requires_grad_(True)
            chunk_loss = dpo_losses(pc, pr, ref[p0:p1], ref[n + p0 : n + p1], **opts["loss"]).sum() * (
                opts["loss_scale"] / n)
            gc, gr = torch.autograd.grad(chunk_loss, (pc, pr)) if any_grad else (None, None)
        loss += chunk_loss.detach()
        if tok is None:
            continue
        if opts["nll"]:
            nll -= tok[:n_c].sum()
        if not any_grad:
            continue
        coeff_seq = torch.cat([gc, gr])
        if average:
            coeff_seq = coeff_seq / counts[seqs].clamp_min(1)
        coeff = coeff_seq[local]
        if opts["nll"]:
            coeff[:n_c] -= opts["alpha"] * opts["loss_scale"] / n_chosen_tok
        dz = grad_from_exp_(z, inv_sum, y_c, coeff)
        dx = accumulate_head_grads(dz, xs, weight, grad_w, grad_b, need_x)
        if need_x:
            grad_x.index_copy_(0, idx, dx)
        del z, dz

    nll = nll / n_chosen_tok
    if opts["nll"]:
        loss = loss + opts["alpha"] * opts["loss_scale"] * nll
    grads = (
        grad_x.view_as(x) if need_x else None,
        grad_w.to(weight.dtype) if need_w else None,
        grad_b.to(bias.dtype) if need_b else None,
    )
    return loss, _aux(x, weight, bias, logps, ref, nll if opts["nll"] else None, opts["loss"]["beta"]), grads


def _scaled(grads, grad_loss: torch.Tensor) -> tuple:
    """The saved gradients times the upstream gradient of the loss. The usual upstream gradient is exactly 1: hand
    the saved gradients over rather than allocating a scaled copy (a second V x H buffer, 479 MB at Show-o's head in
    fp32). One scalar read per step."""
    if grad_loss is None or bool(grad_loss == 1):
        return tuple(grads)
    return tuple(None if g is None else g * grad_loss.to(g.dtype) for g in grads)


class _ChunkedFusedDPO(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, y, ref_x, ref_w, ref_b, ref_given, opts: dict):
        loss, aux, grads = _chunked(x, weight, bias, y, ref_x, ref_w, ref_b, ref_given, opts)
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(*aux)
        return (loss, *aux)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        gx, gw, gb = _scaled(ctx.saved_tensors, grad_loss)
        return gx, gw, gb, None, None, None, None, None, None


def _twopass(x, weight, bias, y, ref_x, ref_w, ref_b, ref_given, opts):
    """linear_logprobs (Triton on CUDA) + DPO loss under plain autograd."""
    n = x.shape[0] // 2
    ig = opts["ignore_index"]
    keep = (y != ig).float()
    counts = keep.sum(1)

    def seq_logps(h, w, b):  # (2B,) sum or mean over each sequence's tokens, and the (2B, T) token log-probs
        tok = linear_logprobs(h, w, y, b, ig, chunk_bytes=opts["chunk_bytes"])
        return (tok.sum(1) / counts.clamp_min(1) if opts["average"] else tok.sum(1)), tok

    logps, tok = seq_logps(x, weight, bias)
    if ref_given is not None:
        ref = ref_given.to(logps.dtype)
    elif ref_x is not None:
        with torch.no_grad():
            ref = seq_logps(ref_x, ref_w, ref_b)[0]
    else:
        ref = torch.zeros_like(logps)
    loss = dpo_losses(logps[:n], logps[n:], ref[:n], ref[n:], **opts["loss"]).mean()
    nll = -tok[:n].sum() / keep[:n].sum().clamp_min(1)
    if opts["nll"]:
        loss = loss + opts["alpha"] * nll
    loss = loss * opts["loss_scale"]
    return (loss, *_aux(x, weight, bias, logps, ref, nll if opts["nll"] else None, opts["loss"]["beta"]))


def fused_linear_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    beta: float = 0.1,
    compute_nll_loss: bool = False,
    compiled: bool = True,
    use_ref_model: bool = True,
    average_log_prob: bool = False,
    chunk_size: int | None = None,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    alpha: float = 1.0,
    *,
    cdpo: bool = False,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_bytes: int | None = None,
    loss_scale: float = 1.0,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Functional twin of :class:`FusedLinearDPOLoss`; its positional arguments are liger-kernel's
    ``liger_fused_linear_dpo`` / ``LigerFusedLinearDPOFunction.apply``'s, in the same order.

    Args:
        hidden: (2B, T, H) policy hidden states, chosen rows [0, B) over rejected rows [B, 2B).
        weight, bias: policy LM head (V, H), (V,). targets: (2B, T) next-token ids or ``ignore_index``.
        ref_hidden, ref_weight, ref_bias: reference hidden states (2B, T, H') and head (``ref_weight`` defaults to
            ``weight``); or ``ref_chosen_logps``/``ref_rejected_logps`` (B,) precomputed; or neither, or
            ``use_ref_model=False``: reference-free (log-ratios against 0).
        beta, loss_type, label_smoothing, discopop_tau: the loss, liger's definitions (module docstring); every type
            of ``DPO_LOSS_TYPES``. ``cdpo=True``: ε applies to 'sigmoid' as conservative DPO (TRL's; not liger's).
        average_log_prob: mean instead of sum over a sequence's tokens (always on for ``loss_type='ipo'``, as TRL).
        compute_nll_loss, alpha: add α·NLL of the chosen tokens (RPO).
        compiled: accepted for liger's signature, ignored.
        chunk_size: pairs per chunk; None: chunks sized by ``chunk_bytes`` of fp32 logits, or when that is None by
            default a quarter of the scored rows, at least 512 (``logprobs.default_chunk_rows``).
        backend: "auto" ("twopass" on CUDA with Triton, else "chunked"), "chunked" (gradients in forward, 3+1
            GEMMs), "twopass" (linear_logprobs, Triton on CUDA).
        loss_scale: a constant factor on the returned loss (a loss weight, 1/accumulation steps). The chunked path
            folds it into the per-sequence coefficients of the gradients it computes in the forward pass, so a
            backward from ``loss_scale * loss`` costs nothing, where ``loss * c`` rescales the (V, H) weight gradient
            in backward (a pass over 90 MB at Show-o's head in fp32, ~40 ms on 2 CPU cores).
    Returns:
        (loss, (chosen_logps (B,), rejected_logps (B,), chosen_logits_mean, rejected_logits_mean, nll_loss,
        chosen_rewards (B,), rejected_rewards (B,))): liger-kernel's tuple.
    """
    check_fused_dpo_options(beta, loss_type, label_smoothing, cdpo, chunk_size, backend, stacklevel=2)
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, ref_given = _prepare(
        hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, ignore_index, use_ref_model,
        ref_chosen_logps, ref_rejected_logps)
    grad_on = torch.is_grad_enabled()
    needs = tuple(grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias))
    opts = _options(ignore_index, beta, compute_nll_loss, average_log_prob, chunk_size, loss_type, label_smoothing,
                    discopop_tau, alpha, cdpo, chunk_bytes, loss_scale, needs)
    args = (hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, ref_given, opts)
    if backend == "auto":
        backend = "twopass" if resolve_logprobs_backend("auto", hidden.device) == "triton" else "chunked"
    with autocast_off(hidden.device):
        out = _twopass(*args) if backend == "twopass" else _ChunkedFusedDPO.apply(*args)
    return out[0], tuple(out[1:])


class FusedLinearDPOFunction(torch.autograd.Function):
    """The autograd Function of liger-kernel's ``LigerFusedLinearDPOFunction``, same 18 positional arguments:

    ``FusedLinearDPOFunction.apply(_input, weight, target, bias, ref_input, ref_weight, ref_bias, ignore_index, beta,
    compute_nll_loss, compiled, use_ref_model, average_log_prob, chunk_size, loss_type, label_smoothing,
    discopop_tau, alpha) -> (loss, aux)``, aux liger's 7-tuple. Always the "chunked" path (gradients computed in
    forward, ``backward`` scales them); ``chunk_size=None`` (the default here, liger's is 1) sizes chunks by memory.
    For the keyword-only extras (cdpo, precomputed reference, backend, loss_scale) call
    :func:`fused_linear_dpo_loss`.
    """

    @staticmethod
    def forward(ctx, _input, weight, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None,
                ignore_index=-100, beta=0.1, compute_nll_loss=False, compiled=True, use_ref_model=True,
                average_log_prob=False, chunk_size=None, loss_type="sigmoid", label_smoothing=0.0,
                discopop_tau=0.05, alpha=1.0):
        check_fused_dpo_options(beta, loss_type, label_smoothing, False, chunk_size, stacklevel=3)
        originals = (_input, weight, bias)
        x, w, b, rx, rw, rb, _ = _prepare(_input, weight, target, bias, ref_input, ref_weight, ref_bias,
                                          ignore_index, use_ref_model)
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[3])
        opts = _options(ignore_index, beta, compute_nll_loss, average_log_prob, chunk_size, loss_type,
                        label_smoothing, discopop_tau, alpha, False, None, 1.0, needs)
        with autocast_off(x.device):
            loss, aux, grads = _chunked(x, w, b, target, rx, rw, rb, None, opts)
        # under autocast the GEMMs ran in autocast's dtype; the gradients go back in each input's own dtype
        ctx.save_for_backward(*(None if g is None else g.to(t.dtype) for g, t in zip(grads, originals)))
        return loss, aux

    @staticmethod
    def backward(ctx, grad_loss, *_):
        gx, gw, gb = _scaled(ctx.saved_tensors, grad_loss)
        return (gx, gw, None, gb) + (None,) * 14


class FusedLinearDPOLoss(torch.nn.Module):
    """Fused linear + DPO loss with liger-kernel's constructor and ``forward`` (drop-in for LigerFusedLinearDPOLoss).

    ``forward(lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None)
    -> (loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards,
    rejected_rewards))``. ``_input`` is (2B, T, H), chosen over rejected. Liger's loss definitions; the departures
    (module docstring): ``cdpo=True`` makes ε act on 'sigmoid' as TRL's conservative DPO (said once at
    construction); ``ipo`` is supported (length-normalized, as TRL); ``chunk_size`` is pairs per chunk, None (the
    default) sizes chunks by memory (``chunk_bytes``, or a quarter of the scored rows); ``compiled`` is accepted
    and ignored.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        use_ref_model: bool = True,
        average_log_prob: bool = False,
        chunk_size: int | None = None,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
        cdpo: bool = False,
        backend: str = "auto",
        chunk_bytes: int | None = None,
    ):
        super().__init__()
        check_fused_dpo_options(beta, loss_type, label_smoothing, cdpo, chunk_size, backend, stacklevel=2)
        self.ignore_index, self.beta, self.alpha = ignore_index, beta, alpha
        self.compute_nll_loss, self.compiled, self.use_ref_model = compute_nll_loss, compiled, use_ref_model
        self.average_log_prob, self.chunk_size, self.loss_type = average_log_prob, chunk_size, loss_type
        self.label_smoothing, self.discopop_tau, self.cdpo = label_smoothing, discopop_tau, cdpo
        self.backend, self.chunk_bytes = backend, chunk_bytes

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None):
        return fused_linear_dpo_loss(
            _input, lin_weight, target, bias, ref_input, ref_weight, ref_bias, self.ignore_index, self.beta,
            self.compute_nll_loss, self.compiled, self.use_ref_model, self.average_log_prob, self.chunk_size,
            self.loss_type, self.label_smoothing, self.discopop_tau, self.alpha,
            cdpo=self.cdpo, backend=self.backend, chunk_bytes=self.chunk_bytes,
        )
