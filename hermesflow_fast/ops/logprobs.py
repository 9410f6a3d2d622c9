"""Fused linear + log-softmax + gather: per-token log p(target) without ever materializing [tokens × V] logits.

    z_t = x_t Wᵀ + b,   logp_t = z_t[y_t] − logsumexp_v z_t[v]          (0 where y_t == ignore_index)
    backward, upstream g_t:  dz_t = g_t (onehot(y_t) − softmax(z_t)),  dx = dz W,  dW = dzᵀ x,  db = Σ_t dz_t

Paths (``backend=``):
  "triton"  CUDA: kernels/linear_logprobs.py, tiles of z in SRAM, online logsumexp, recompute in backward.
            ``dw_mode=`` picks its backward: "owned" (each dW / db / dx tile summed in fp32 and written once, a dz
            scratch bounded to 0.18× inputs + gradients, deterministic), "atomic" (fp32 atomics into fp32 dx / dW
            buffers: 1.0× inputs + gradients extra in bf16), "auto" (owned for fp16 / bf16, atomic for fp32).
            The torch path ignores it.
  "torch"   any device: rows chunked (``chunk_bytes`` of fp32 logits per chunk, or by default a quarter of the rows,
            512 rows at least, see :func:`default_chunk_rows`), one chunk of logits alive; forward keeps only the
            logsumexp (N floats); backward recomputes each chunk's logits (the two-pass design of CCE / torch's
            ``reduction='none'``): 4 GEMMs for forward + backward. Ignored rows never reach a GEMM.
  "auto"    triton on CUDA when Triton imports, else torch (said once).
Accumulation is fp32 whatever the input dtype: softmax math in fp32, dW and db accumulated in fp32 buffers.

    hermesflow bench logprobs --help
"""

from __future__ import annotations

import os

import torch

from hermesflow_fast._notice import say_once
from hermesflow_fast.ops._checks import autocast_cast, autocast_off, check_linear_head

__all__ = ["linear_logprobs", "LinearLogprobs", "default_chunk_rows", "max_chunk_bytes"]


# Default chunking of the torch paths, in rows of fp32 logits (a chunk of r rows holds r × V × 4 bytes):
CHUNK_FRACTION = 4  # a chunk holds at most 1/4 of the rows scored in one call ...
MIN_CHUNK_ROWS = 512  # ... but never fewer than this many (smaller GEMMs lose efficiency) ...


def max_chunk_bytes(device: torch.device) -> int:
    """... and at most this many bytes of fp32 logits (unless that is below MIN_CHUNK_ROWS rows): 256 MiB on CPU,
    512 MiB on GPUs. Past a few hundred rows a larger chunk buys no GEMM efficiency, only memory."""
    return (512 if device.type == "cuda" else 256) * 2**20


def default_chunk_rows(rows: int, vocab: int, device: torch.device) -> int:
    """Rows of one chunk when the caller gives no budget, for a call that scores ``rows`` rows against V = ``vocab``.

    clamp(ceil(rows / CHUNK_FRACTION), MIN_CHUNK_ROWS, max(MIN_CHUNK_ROWS, max_chunk_bytes / 4V)). From 2048 tokens
    up (rows ≥ ~1,950, so 512 rows is at most ~0.26 of them) a chunk's logits are then about 1/4 of the (rows, V) fp32
    logits or less, which the naive path holds 3.0–3.7 times over (CPU fp32, bench/results/logprobs.csv), so the fused
    ops' extra memory stays under 1/8 of the naive path's: measured 0.069–0.089 at H=1024/2048,
    V=32768/58498/151936; ``hermesflow bench logprobs --grid --plan`` models every head of the grid. A fixed
    byte budget (256 MiB before) held half of all rows at H=1024, V=32768, 4096 tokens. The floor of 512 rows keeps
    the GEMMs efficient; below 2048 tokens it means one or two chunks.
    """
    cap = max(MIN_CHUNK_ROWS, max_chunk_bytes(device) // (4 * vocab))
    return max(1, min(cap, max(MIN_CHUNK_ROWS, -(-rows // CHUNK_FRACTION))))


def chunk_rows_for(rows: int, vocab: int, device: torch.device, chunk_bytes: int | None) -> int:
    """Rows per chunk: from an explicit ``chunk_bytes`` budget, else :func:`default_chunk_rows`."""
    return rows_per_chunk(vocab, chunk_bytes) if chunk_bytes is not None else default_chunk_rows(rows, vocab, device)


def logits_buffer(rows: int, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """One (rows, V) buffer that every chunk's logits are written into: one allocation (and one round of page
    faults on CPU, where each fresh 100+ MB block is a new mmap) instead of one per chunk. None on CUDA for 16-bit
    inputs (their fp32 logits come from cuBLAS's out_dtype, and the caching allocator already reuses blocks); on CPU
    16-bit logits are upcast into it."""
    if x.is_cuda and x.dtype in _HALF:
        return None
    return torch.empty((rows, weight.shape[0]), dtype=acc_dtype(x), device=x.device)


def rows_per_chunk(vocab: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (4 * vocab))


# ---------------------------------------------------------------------------------------------------------------------
# building blocks, shared with the fused DPO op
# ---------------------------------------------------------------------------------------------------------------------


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float32 for half/bfloat16/float32 inputs, float64 for float64 (tests, gradcheck)."""
    return torch.promote_types(t.dtype, torch.float32)


_HALF = (torch.bfloat16, torch.float16)


def chunk_logits(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, buf: torch.Tensor | None = None
) -> torch.Tensor:
    """(R, H) @ (V, H)ᵀ + b -> (R, V) in acc_dtype. The GEMM runs in the input dtype (fp32 accumulate in BLAS).

    On CUDA, 16-bit inputs get fp32 logits straight from cuBLAS's fp32 accumulators (``out_dtype``), instead of
    logits rounded to bf16 (8 mantissa bits: ±0.03 at |z| ≈ 10) and upcast.
    """
    if x.is_cuda and x.dtype in _HALF:
        z = torch.mm(x, weight.t(), out_dtype=torch.float32)
        return z if bias is None else z.add_(bias)
    if buf is not None:  # written in place into the first R rows of the shared buffer
        out = buf[: x.shape[0]]
        if buf.dtype == x.dtype:
            return torch.mm(x, weight.t(), out=out) if bias is None else torch.addmm(bias, x, weight.t(), out=out)
        z = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())  # 16-bit on CPU: upcast into buf
        return out.copy_(z)
    z = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
    return z.to(acc_dtype(z))


def exp_stats_(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In place z <- exp(z − rowmax), the unnormalized softmax. Returns (lse, target logit, 1 / rowsum), each (R,).

    Four passes over the chunk (max, subtract, exp, sum) and no temporary of its size: torch.logsumexp followed by
    a separate softmax costs two more passes and a chunk-sized allocation.
    """
    tgt = z.gather(1, y.unsqueeze(1)).squeeze(1)
    m = z.amax(1, keepdim=True)  # (R, 1)
    z.sub_(m).exp_()
    s = z.sum(1)
    return s.log().add_(m.squeeze(1)), tgt, s.reciprocal_()


CPU_BLOCK_ROWS = 32  # rows of fp32 logits (32 × 58,498 × 4 B = 7.5 MB) that stay in cache between passes


def logits_stats_(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, buf: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`chunk_logits` then :func:`exp_stats_`: (z = exp(logits − rowmax), lse, target logit, 1 / rowsum).

    On CPU the GEMM runs without the bias, then the bias add, target gather, max, exp and sum run ``CPU_BLOCK_ROWS``
    rows at a time while those rows are in cache: one trip through memory instead of five (GEMM + stats of 508 rows
    at V = 58,498 on 2 cores: 278 ms instead of 335 ms).
    """
    n = x.shape[0]
    if x.is_cuda or n <= CPU_BLOCK_ROWS:
        z = chunk_logits(x, weight, bias, buf)
        return (z, *exp_stats_(z, y))
    z = chunk_logits(x, weight, None, buf)
    m, s, tgt = (z.new_empty(n) for _ in range(3))
    b = None if bias is None else bias.to(z.dtype)
    for i in range(0, n, CPU_BLOCK_ROWS):
        j = min(i + CPU_BLOCK_ROWS, n)
        zb = z[i:j]
        if b is not None:
            zb.add_(b)
        tgt[i:j] = zb.gather(1, y[i:j].unsqueeze(1)).squeeze(1)
        mb = zb.amax(1, keepdim=True)
        zb.sub_(mb).exp_()
        s[i:j] = zb.sum(1)
        m[i:j] = mb.squeeze(1)
    return z, s.log().add_(m), tgt, s.reciprocal_()


def grad_from_exp_(e: torch.Tensor, inv_sum: torch.Tensor, y: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """In place, e = exp(z − rowmax) from :func:`exp_stats_`: e <- coeff·(onehot(y) − e / rowsum).

    That is ∂(Σ_t coeff_t·logp_t)/∂z, the gradient of the logits, without recomputing them.
    """
    e.mul_((-coeff * inv_sum).unsqueeze(1))
    e.scatter_add_(1, y.unsqueeze(1), coeff.unsqueeze(1))
    return e


def logits_to_grad_(z: torch.Tensor, lse: torch.Tensor, y: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """In place: z <- coeff·(onehot(y) − exp(z − lse)), the gradient of Σ_t coeff_t·logp_t w.r.t. the logits."""
    z.sub_(lse.unsqueeze(1)).exp_().mul_(-coeff.unsqueeze(1))
    z.scatter_add_(1, y.unsqueeze(1), coeff.unsqueeze(1))
    return z


def accumulate_head_grads(
    dz: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    grad_w: torch.Tensor | None,
    grad_b: torch.Tensor | None,
    need_x: bool,
) -> torch.Tensor | None:
    """dz (R, V) fp32 -> dx (R, H) in x.dtype; adds dzᵀ x into grad_w (fp32) and Σ dz into grad_b (fp32)."""
    if grad_w is not None:
        if x.dtype == grad_w.dtype:
            grad_w.addmm_(dz.t(), x)
        elif x.is_cuda:  # 16-bit GEMM on the tensor cores, fp32 running sum across chunks (Liger #830's lesson)
            grad_w.add_(dz.to(x.dtype).t() @ x)
        else:  # CPU: the whole product in fp32
            grad_w.addmm_(dz.t(), x.to(grad_w.dtype))
    if grad_b is not None:
        grad_b.add_(dz.sum(0))
    if not need_x:
        return None
    return dz.to(weight.dtype) @ weight


def chunked_token_logprobs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    chunk_rows: int,
    rows: torch.Tensor | None = None,
    buf: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores rows of x (N, H): all of them, or those indexed by ``rows`` (R,), whose targets are y (R,), all valid.

    Returns (logp (R,), lse (R,)) in acc_dtype, with one chunk of logits alive at a time; a chunk's rows are gathered
    when it is scored, never all at once.
    """
    n = x.shape[0] if rows is None else rows.numel()
    logp = torch.empty(n, dtype=acc_dtype(x), device=x.device)
    lse = torch.empty_like(logp)
    buf = buf if buf is not None or n == 0 else logits_buffer(min(chunk_rows, n), weight, x)
    for s in range(0, n, chunk_rows):
        e = min(s + chunk_rows, n)
        xs = x[s:e] if rows is None else x.index_select(0, rows[s:e])
        z, lse[s:e], tgt, _ = logits_stats_(xs, weight, bias, y[s:e], buf)  # z: (r, V)
        logp[s:e] = tgt - lse[s:e]
        del z
    return logp, lse


# ---------------------------------------------------------------------------------------------------------------------
# torch path
# ---------------------------------------------------------------------------------------------------------------------


class _ChunkedLinearLogprobs(torch.autograd.Function):
    """Two-pass chunked path: forward saves the logsumexp, backward recomputes each chunk of logits."""

    @staticmethod
    def forward(ctx, x, weight, bias, y, ignore_index: int, chunk_bytes: int | None):
        keep = (y != ignore_index).nonzero().squeeze(1)  # (R,) rows that count
        yk = y.index_select(0, keep).long()
        rows = chunk_rows_for(keep.numel(), weight.shape[0], x.device, chunk_bytes)
        logp_k, lse_k = chunked_token_logprobs(x, weight, bias, yk, rows, keep)
        out = torch.zeros(x.shape[0], dtype=logp_k.dtype, device=x.device)
        out.index_copy_(0, keep, logp_k)
        ctx.save_for_backward(x, weight, bias, yk, keep, lse_k)  # x itself, not a copy of its valid rows
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, yk, keep, lse_k = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        acc = acc_dtype(x)
        g = grad_out.to(acc).index_select(0, keep)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        dx_full = torch.zeros_like(x) if need_x else None
        buf = logits_buffer(min(ctx.rows, keep.numel()), weight, x) if keep.numel() else None
        for s in range(0, keep.numel(), ctx.rows):
            e = min(s + ctx.rows, keep.numel())
            xs = x.index_select(0, keep[s:e])
            z = chunk_logits(xs, weight, bias, buf)
            dz = logits_to_grad_(z, lse_k[s:e], yk[s:e], g[s:e])
            dx = accumulate_head_grads(dz, xs, weight, grad_w, grad_b, need_x)
            if need_x:
                dx_full.index_copy_(0, keep[s:e], dx)
            del z, dz
        dw = grad_w.to(weight.dtype) if need_w else None
        db = grad_b.to(bias.dtype) if need_b else None
        return dx_full, dw, db, None, None, None


# ---------------------------------------------------------------------------------------------------------------------
# public op
# ---------------------------------------------------------------------------------------------------------------------

_BACKENDS = ("auto", "torch", "triton")
DW_MODES = ("auto", "owned", "atomic")  # the Triton backward's modes (kernels.linear_logprobs.DW_MODES)


def check_dw_mode(dw_mode: str) -> None:
    if dw_mode not in DW_MODES:
        raise ValueError(f"dw_mode={dw_mode!r} is not one of {DW_MODES}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA when Triton is importable, else 'torch'. Unknown names raise ValueError."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {_BACKENDS}")
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return "torch"
    from hermesflow_fast.kernels import linear_logprobs as kern

    interpreting = os.environ.get("TRITON_INTERPRET") == "1"  # CPU tensors run the kernels in Triton's interpreter
    if kern.HAS_TRITON and (device.type == "cuda" or (backend == "triton" and interpreting)):
        return "triton"
    if backend == "triton":
        raise ValueError(
            f"backend='triton' needs Triton and a CUDA tensor (Triton importable: {kern.HAS_TRITON}, device: {device})"
        )
    say_once(
        "linear_logprobs.triton",
        "hermesflow_fast: Triton is not importable, linear_logprobs runs its chunked torch path on CUDA; "
        "`pip install triton` for the fused kernel.",
    )
    return "torch"


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    *,
    backend: str = "auto",
    chunk_bytes: int | None = None,
    dw_mode: str = "auto",
) -> torch.Tensor:
    """Per-token log p(target) of a linear head, without materializing the [tokens × V] logits.

    Args:
        hidden: (N, H) or (B, T, H) hidden states (any float dtype; fp32 accumulation).
        weight: (V, H) LM-head weight. bias: optional (V,).
        targets: (N,) or (B, T) integer ids in [0, V), or ``ignore_index``.
        backend: "auto" | "torch" | "triton" (see module docstring). chunk_bytes: logits budget of the torch path
            (None: :func:`default_chunk_rows`). dw_mode: the Triton backward, "auto" | "owned" | "atomic" (module
            docstring; ignored by the torch path).
    Returns:
        float32 (float64 for float64 inputs), (N,) or (B, T): log p(target), 0 at ``ignore_index``.
        Differentiable in hidden, weight and bias.
    """
    check_dw_mode(dw_mode)
    hidden, weight, bias = autocast_cast(hidden, weight, bias)
    check_linear_head("linear_logprobs", hidden, weight, targets, bias, ignore_index)
    with autocast_off(hidden.device):
        return _linear_logprobs(hidden, weight, targets, bias, ignore_index, backend, chunk_bytes, dw_mode)


def _linear_logprobs(hidden, weight, targets, bias, ignore_index, backend, chunk_bytes, dw_mode) -> torch.Tensor:
    lead = targets.shape
    x = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    path = resolve_backend(backend, x.device)
    if path == "triton":
        from hermesflow_fast.kernels.linear_logprobs import LinearLogprobsFunction

        xc, wc, yc = x.contiguous(), weight.contiguous(), y.long().contiguous()
        out = LinearLogprobsFunction.apply(xc, wc, yc, bias, ignore_index, dw_mode)
    else:
        out = _ChunkedLinearLogprobs.apply(x, weight, bias, y, ignore_index, chunk_bytes)
    return out.reshape(lead)


class LinearLogprobs(torch.nn.Module):
    """Module twin of :func:`linear_logprobs`: ``forward(hidden, weight, targets, bias=None)``."""

    def __init__(self, ignore_index: int = -100, backend: str = "auto", chunk_bytes: int | None = None,
                 dw_mode: str = "auto"):
        super().__init__()
        if backend not in _BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {_BACKENDS}")
        check_dw_mode(dw_mode)
        self.ignore_index, self.backend, self.chunk_bytes, self.dw_mode = ignore_index, backend, chunk_bytes, dw_mode

    def forward(self, hidden, weight, targets, bias=None):
        return linear_logprobs(
            hidden, weight, targets, bias, self.ignore_index, backend=self.backend, chunk_bytes=self.chunk_bytes,
            dw_mode=self.dw_mode,
        )
