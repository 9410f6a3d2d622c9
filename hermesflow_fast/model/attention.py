"""Attention backends behind one call: ``attend(q, k, v, mask, backend, scale)``.

    q (B, H, Tq, D), k/v (B, H, Tk, D), Tq <= Tk: the queries are the LAST Tq positions (a KV-cached step)
    mask: OmniMask (structured tags, model/masks.py) | bool (B, Tq, Tk) / (B, 1, Tq, Tk), True = may attend
          | MaskPlan (from ``prepare(mask)``) | None (= full bidirectional attention)
    -> (B, H, Tq, D)

Backends (``BACKENDS``):
  "sdpa"   F.scaled_dot_product_attention with a dense boolean mask; any device, forward + backward (the CPU path).
           An OmniMask over T queries and T keys is split first (``split_attention``): per row, per packed sequence
           (segment), one SDPA call for the shared tokens with the first branch and one per later branch over the
           shared tokens and that branch, when that scores at most ``SPLIT_MAX_WORK`` of the dense call's entries.
           No score outside a query's sequence and branches is computed: a row of four packed pairs costs the sum of
           the sequences' squares, not the row's square (on CPU, attention over 4,000-token rows went from ~35% of a
           training step to a few %). Exact; pad query rows get 0, as on the flash path. Not used while compiling.
  "flex"   FlexAttention with ``OmniMask.mask_mod()`` (or a lookup into a dense mask) and a BlockMask whose tiles
           are read off the dense mask (``block_mask_from_dense``: create_block_mask's tiles without evaluating
           mask_mod over the whole grid): compiled once per process on CUDA (fully masked 128×128 tiles skipped,
           fully allowed ones run without the mask); on CPU it runs uncompiled and
           forward only (torch has no CPU backward for it), so a CPU call that needs gradients takes "sdpa" (said
           once). Compiled CPU flex is not used (inside a compiled model on CPU "flex" runs as "sdpa"): in torch
           2.13 inductor's CPU flex kernel returned wrong values / NaN for some lengths below the block size.
  "varlen" torch's own ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 inside; no extra package), CUDA,
           bf16/fp16, OmniMask only, exact: the mask decomposed into one causal call (``window_size=(-1, 0)``) and
           one bidirectional call over cumulative sequence offsets (no mask tensor at all: model/mask_plan.py).
  "flash"  the same decomposition on flash-attention's varlen kernel (FA2 ``flash_attn.flash_attn_varlen_func``; FA4
           ``flash_attn.cute`` when that is the one installed), for a torch without ``varlen_attn``.
  "eager"  matmul + softmax in fp32: the dense reference the tests compare against.
  "auto"   CUDA: for an OmniMask in 16 bits "varlen" (or "flash" where torch lacks it and flash-attn imports; the
           choice is printed once), "sdpa" without a mask,
           else "flex", except that a KV-cached step (Tq < Tk) under "flex" runs "sdpa": decoding meets a new Tk
           every token, and flex would rebuild its block mask and re-specialize its compiled kernel each time;
           CPU: "sdpa". ``resolve_backend`` applies this (and the fallbacks) for a model config.

Mask plans (model/mask_plan.py). Everything derived from a mask (the dense boolean mask, the FlexAttention
BlockMask, the SDPA split, the flash varlen decomposition: per row, one segment per run of tokens with the same block
and branch, non-causal for a block, causal otherwise) is built once per mask object and kept in its ``MaskPlan``;
``prepare(mask)`` returns it, and ``attend`` accepts a plan as the mask (call ``prepare`` outside a compiled region).
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from hermesflow_fast._notice import say_once
from hermesflow_fast.model.mask_plan import (
    SPLIT_MAX_WORK,
    GroupPlan,
    MaskPlan,
    VarlenPlan,
    block_mask_from_dense,
    prepare,
)
from hermesflow_fast.model.masks import OmniMask

# the mask plans live in model/mask_plan.py; their names stay importable from here
__all__ = ["BACKENDS", "SPLIT_MAX_WORK", "GroupPlan", "MaskPlan", "VarlenPlan", "attend", "block_mask_from_dense",
           "eager_attention", "flash_available", "flex_available", "prepare", "resolve_backend", "split_attention",
           "torch_varlen_available", "varlen_attention"]

BACKENDS = ("auto", "sdpa", "flex", "varlen", "flash", "eager")
_HALF = (torch.float16, torch.bfloat16)
_FLASH_INSTALL = "pip install flash-attn --no-build-isolation"


# ---------------------------------------------------------------------------------------------------------------
# dense reference


def eager_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None = None) -> Tensor:
    """Dense reference: softmax(q kᵀ · scale + mask) v in fp32; mask (B, 1, Tq, Tk) bool or None."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v.float()).to(q.dtype)


# ---------------------------------------------------------------------------------------------------------------
# optional kernels


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


_FLEX_COMPILED: Callable | None = None


def _flex_fn(device: torch.device) -> Callable:
    """flex_attention, compiled once per process on CUDA (uncompiled it materializes the scores); plain on CPU."""
    global _FLEX_COMPILED
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _FLEX_COMPILED is None:
        _FLEX_COMPILED = torch.compile(flex_attention)
    return _FLEX_COMPILED


_FLASH: list = []  # [varlen fn or None], resolved on first use


def _load_flash_varlen() -> Callable | None:
    """The installed flash-attention varlen kernel wrapped to ``_varlen_reference``'s signature, or None. FA2
    (``flash_attn``) first, then FA4 (``flash_attn.cute``, package flash-attn-4). A package that is present but fails
    to import (built for another torch/CUDA) counts as missing; the error is said once."""
    if not _FLASH:
        fn = None
        for module, name in (("flash_attn", "flash-attn"), ("flash_attn.cute", "flash-attn-4")):
            try:
                kernel = importlib.import_module(module).flash_attn_varlen_func
            except (ModuleNotFoundError, AttributeError):  # flash-attn-4 alone has flash_attn/ without the FA2 API
                continue
            except Exception as e:  # an ABI mismatch raises ImportError/OSError/RuntimeError at import
                say_once(f"attn-{name}-broken", f"{name} is installed but does not import ({type(e).__name__}: {e})")
                continue
            fn = _wrap_flash(kernel, name)
            break
        _FLASH.append(fn)
    return _FLASH[0]


def flash_available() -> bool:
    return _load_flash_varlen() is not None


def _wrap_flash(kernel: Callable, name: str) -> Callable:
    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False, softmax_scale=None):
        if q.dtype not in _HALF:
            raise ValueError(f"backend='flash' ({name}) needs bf16/fp16 q/k/v, got {q.dtype}; cast the model to "
                             "bf16, or use backend='flex' or 'sdpa' for fp32")
        if not q.is_cuda:
            raise ValueError(f"backend='flash' ({name}) needs CUDA tensors, got {q.device}")
        out = kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     softmax_scale=softmax_scale, causal=causal)
        return out[0] if isinstance(out, tuple) else out  # FA4 returns (out, lse)

    varlen.kernel_name = name
    return varlen


_TORCH_VARLEN: list = []  # [varlen fn or None], resolved on first use


def _load_torch_varlen() -> Callable | None:
    """torch's own varlen attention (``torch.nn.attention.varlen.varlen_attn``: FlashAttention-2 inside, CUDA,
    16-bit) wrapped to ``_varlen_reference``'s signature, or None when this torch has none."""
    if not _TORCH_VARLEN:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            varlen_attn = None
        _TORCH_VARLEN.append(None if varlen_attn is None else _wrap_torch_varlen(varlen_attn))
    return _TORCH_VARLEN[0]


def torch_varlen_available() -> bool:
    """torch's built-in varlen attention can run here (the module imports and CUDA is present)."""
    return _load_torch_varlen() is not None and torch.cuda.is_available()


def _wrap_torch_varlen(kernel: Callable, check: bool = True) -> Callable:
    """``kernel`` (``varlen_attn``'s signature) as ``_varlen_reference``'s; ``check=False`` skips the CUDA / 16-bit
    checks (tests drive the translation on CPU with a stand-in kernel)."""

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False, softmax_scale=None):
        if not check:
            pass
        elif q.dtype not in _HALF:
            raise ValueError(f"backend='varlen' (torch varlen_attn) needs bf16/fp16 q/k/v, got {q.dtype}; cast the "
                             f"model to bf16, or use backend='flex' or 'sdpa' for fp32")
        elif not q.is_cuda:
            raise ValueError(f"backend='varlen' (torch varlen_attn) needs CUDA tensors, got {q.device}")
        # FA2's causal is bottom-right aligned, as window (-1, 0) is; (-1, -1) is full attention
        return kernel(q, k, v, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32), int(max_seqlen_q),
                      int(max_seqlen_k), scale=softmax_scale, window_size=(-1, 0) if causal else (-1, -1))

    varlen.kernel_name = "torch varlen_attn"
    return varlen


def _varlen_reference(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                      max_seqlen_q: int, max_seqlen_k: int, causal: bool = False,
                      softmax_scale: float | None = None) -> Tensor:
    """FA2's ``flash_attn_varlen_func`` semantics in plain torch (fp32 math, differentiable; for tests and CPU).

    q (total_q, H, D), k/v (total_k, H, D) packed; segment i is q[cu_q[i]:cu_q[i+1]] over k[cu_k[i]:cu_k[i+1]].
    causal: bottom-right aligned, query m of n sees keys 0 … m + (L − n) of L; a query that sees no key outputs 0.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_q has {len(cq)} entries but cu_seqlens_k has {len(ck)}")
    outs = []
    for i in range(len(cq) - 1):
        qs, ks, vs = q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]]
        n, L = qs.shape[0], ks.shape[0]
        if n > max_seqlen_q or L > max_seqlen_k:
            raise ValueError(f"segment {i} has {n} queries / {L} keys, above max_seqlen {max_seqlen_q}/{max_seqlen_k}")
        if n == 0:
            continue
        if L == 0:
            outs.append(qs.new_zeros(n, qs.shape[1], vs.shape[-1], dtype=torch.float32))
            continue
        s = torch.einsum("nhd,lhd->hnl", qs.float(), ks.float()) * scale
        if causal:
            see = torch.arange(L, device=q.device)[None, :] <= torch.arange(n, device=q.device)[:, None] + (L - n)
            empty = ~see.any(-1, keepdim=True)  # (n, 1): rows that see nothing (only when L < n)
            s = s.masked_fill(~see, float("-inf")).masked_fill(empty, 0.0)
            p = torch.softmax(s, dim=-1).masked_fill(empty, 0.0)
        else:
            p = torch.softmax(s, dim=-1)
        outs.append(torch.einsum("hnl,lhd->nhd", p, vs.float()))
    if not outs:
        return q.new_zeros(0, q.shape[1], v.shape[-1])
    return torch.cat(outs).to(q.dtype)


# ---------------------------------------------------------------------------------------------------------------
# row gathers (the split and varlen paths)


def _rows(t: Tensor) -> Tensor:
    """(B, H, T, D) → (B·T, H, D): one row per token, what the split and varlen paths gather from."""
    B, H, T, D = t.shape
    return t.transpose(1, 2).reshape(B * T, H, D)


def _scatter_rows(outs: list[Tensor], rows: Tensor, q: Tensor, v: Tensor) -> Tensor:
    """The per-call outputs (rows, H, Dv), concatenated in ``rows`` order, back to (B, H, Tq, Dv); rows no call
    produced (pad queries) are 0."""
    B, H, Tq, _ = q.shape
    out = q.new_zeros(B * Tq, H, v.shape[-1])
    if outs:
        out = out.index_copy(0, rows, torch.cat(outs) if len(outs) > 1 else outs[0])
    return out.view(B, Tq, H, -1).transpose(1, 2)


def split_attention(q: Tensor, k: Tensor, v: Tensor, plan: GroupPlan, scale: float | None = None) -> Tensor:
    """SDPA once per group of ``plan`` on the gathered rows (no key outside a query's segment and branches is ever
    scored); pad query rows get 0, as on the flash path."""
    qf, kf, vf = _rows(q), _rows(k), _rows(v)
    outs = []
    for q_idx, k_idx, see in plan.groups:
        og = F.scaled_dot_product_attention(qf.index_select(0, q_idx).transpose(0, 1)[None],
                                            kf.index_select(0, k_idx).transpose(0, 1)[None],
                                            vf.index_select(0, k_idx).transpose(0, 1)[None], attn_mask=see, scale=scale)
        outs.append(og[0].transpose(0, 1))
    return _scatter_rows(outs, plan.q_rows, q, v)


# ---------------------------------------------------------------------------------------------------------------
# backends


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, mask: OmniMask | MaskPlan | None = None,
                     scale: float | None = None, varlen_fn: Callable | None = None) -> Tensor:
    """The varlen path: ``mask`` decomposed into a causal and a non-causal varlen call of ``varlen_fn`` (default:
    torch's own ``varlen_attn`` where it runs, else the installed flash-attention; ``_varlen_reference`` runs the same
    decomposition in plain torch). Pad query rows get 0."""
    B, H, Tq, D = q.shape
    Tk = k.shape[-2]
    if varlen_fn is None:
        varlen_fn = _load_torch_varlen() if torch_varlen_available() else _load_flash_varlen()
        if varlen_fn is None:
            raise RuntimeError(f"the varlen path needs torch's varlen_attn (CUDA) or flash-attention: "
                               f"{_FLASH_INSTALL}")
    plan = prepare(mask) or MaskPlan(None)
    vp = plan.varlen(B, Tq, Tk, q.device)
    qf, kf, vf = _rows(q), _rows(k), _rows(v)
    outs = []
    for causal, q_idx, k_idx, cu_q, cu_k, max_q, max_k in vp.calls:
        outs.append(varlen_fn(qf.index_select(0, q_idx), kf.index_select(0, k_idx), vf.index_select(0, k_idx),
                              cu_q, cu_k, max_q, max_k, causal=causal, softmax_scale=scale))
    return _scatter_rows(outs, vp.q_rows, q, v)


@torch.compiler.disable
def _varlen_outside_graph(q: Tensor, k: Tensor, v: Tensor, plan: MaskPlan | None, scale: float | None,
                          fn: Callable | None) -> Tensor:
    return varlen_attention(q, k, v, plan, scale, fn)


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask, scale: float | None) -> Tensor:
    fn = _flex_fn(q.device)
    if q.device.type == "cuda":
        return fn(q, k, v, block_mask=block_mask, scale=scale)
    with warnings.catch_warnings():  # the uncompiled CPU path is deliberate (see the module docstring)
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return fn(q, k, v, block_mask=block_mask, scale=scale)


def _mask_of(mask):
    return mask.mask if isinstance(mask, MaskPlan) else mask


def resolve_backend(backend: str, device: torch.device | str, mask=None, dtype: torch.dtype | None = None) -> str:
    """The backend ``attend`` will run for ``backend`` (one of BACKENDS) on ``device`` with ``mask`` (OmniMask, bool
    tensor, MaskPlan or None) and, if known, the q/k/v ``dtype``: never "auto". A requested fast path that is missing
    falls back with a one-time FallbackWarning: "flash" without flash-attn → "flex" (CUDA) / "sdpa"; "flash" with a
    dense mask → "flex"; "flex"/"flash" without CUDA support → "sdpa"."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    cuda = torch.device(device).type == "cuda"
    m = _mask_of(mask)
    structured = m is None or isinstance(m, OmniMask)
    half = dtype is None or dtype in _HALF
    if backend == "auto":
        if not cuda or m is None:
            return "sdpa"  # no mask: SDPA picks its own flash kernel
        if structured and half and torch_varlen_available():
            name, why = "varlen", "torch's varlen_attn (FlashAttention-2) on the OmniMask's causal/bidirectional runs"
        elif structured and half and flash_available():
            name, why = "flash", "flash-attention varlen on the OmniMask's runs (torch has no varlen_attn)"
        else:
            name = "flex" if flex_available() else "sdpa"
            why = ("a dense mask" if not structured else "fp32 q/k/v" if not half else "no varlen kernel")
        _say_choice(name, why)
        return name
    if backend in ("varlen", "flash"):
        return _varlen_or_fallback(backend, cuda, structured)
    if backend == "flex" and not flex_available():
        say_once("attn-flex-missing", "attention backend 'flex': this torch has no FlexAttention; using 'sdpa'")
        return "sdpa"
    return backend


def _varlen_or_fallback(backend: str, cuda: bool, structured: bool) -> str:
    """``backend`` ("varlen" or "flash") where it can run, else the fallback, said once."""
    if not cuda:
        say_once(f"attn-{backend}-cpu", f"attention backend '{backend}' needs CUDA; using 'sdpa' on this device")
        return "sdpa"
    fallback = "flex" if flex_available() else "sdpa"
    if backend == "varlen" and not torch_varlen_available():
        say_once("attn-varlen-missing", f"attention backend 'varlen': this torch has no varlen_attn "
                 f"(torch.nn.attention.varlen); using '{fallback}'")
        return fallback
    if backend == "flash" and not flash_available():
        say_once("attn-flash-missing", f"attention backend 'flash': flash-attention is not installed "
                 f"({_FLASH_INSTALL}); using '{fallback}'")
        return fallback
    if not structured:
        say_once(f"attn-{backend}-dense", f"attention backend '{backend}' needs an OmniMask, got a dense boolean "
                 f"mask; using '{fallback}'")
        return fallback
    return backend


_CHOSEN: set[str] = set()


def _say_choice(name: str, why: str) -> None:
    """Print which backend ``auto`` runs, once per process and backend (stderr)."""
    if name not in _CHOSEN:
        _CHOSEN.add(name)
        import sys

        print(f"attention: auto → '{name}' ({why})", file=sys.stderr)


def attend(
    q: Tensor, k: Tensor, v: Tensor, mask: OmniMask | Tensor | MaskPlan | None = None, backend: str = "auto",
    scale: float | None = None,
) -> Tensor:
    """Attention of q (B, H, Tq, D) over k/v (B, H, Tk, D) under ``mask`` (see the module docstring)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q/k/v must be (B, H, T, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Tq, _ = q.shape
    Tk = k.shape[-2]
    if k.shape[:2] != (B, H) or v.shape[:3] != k.shape[:3] or Tq > Tk:
        raise ValueError(f"k/v must be (B={B}, H={H}, Tk >= Tq={Tq}, D) like q, got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    compiling = torch.compiler.is_compiling()
    if compiling and not isinstance(mask, MaskPlan):
        plan = None if mask is None else MaskPlan(mask, memo=False)  # no id()/weakref cache in a traced graph
    else:
        plan = prepare(mask)
    name = resolve_backend(backend, q.device, plan, q.dtype)
    if backend == "auto" and name == "flex" and Tq != Tk:
        # a KV-cached step (decoding: a new Tk every token) would build a block mask and re-specialize the compiled
        # flex kernel per step; its dense mask is only (B, Tq, Tk), so SDPA's masked kernel takes it
        name = "sdpa"
    if plan is not None:
        plan.check(B, Tq, Tk)
    if name == "flex" and q.device.type != "cuda":
        if compiling:  # inductor's CPU flex kernel gave wrong values in torch 2.13 (module docstring)
            name = "sdpa"
        elif torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            say_once("attn-flex-cpu-backward", "attention backend 'flex' has no backward on CPU (torch); using "
                     "'sdpa' where gradients are needed")
            name = "sdpa"
    if name in ("varlen", "flash"):
        fn = _load_torch_varlen() if name == "varlen" else _load_flash_varlen()
        # outside the compiled graph: the plan's offsets and lengths change with every batch, and tracing them would
        # specialize (recompile) the block on each; the kernel is one fused call either way
        return _varlen_outside_graph(q, k, v, plan, scale, fn) if compiling else varlen_attention(q, k, v, plan,
                                                                                                   scale, fn)
    if name == "flex":
        return _flex(q, k, v, plan.block_mask(B, Tq, Tk, q.device) if plan is not None else None, scale)
    if name == "sdpa" and plan is not None and Tq == Tk and not compiling:
        groups = plan.groups(B, Tq, q.device)
        if groups is not None:
            return split_attention(q, k, v, groups, scale)
    dense = plan.dense(B, Tq, Tk, q.device) if plan is not None else None
    if name == "eager":
        return eager_attention(q, k, v, dense, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale)
