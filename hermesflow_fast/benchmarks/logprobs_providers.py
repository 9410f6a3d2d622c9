"""The problem and providers of the fused head + DPO benchmark (``benchmarks.logprobs``): the problem's shapes
(``Problem``), its deterministic inputs (``build_inputs``), the chunking ours plans for it (``planned_chunks``,
``plan_table``), each provider's forward (``PROVIDERS``: naive, TRL, liger, torch's chunked cross-entropy, ours,
and the GEMM floor) with its memory estimate, and the check that they agree (``check_providers``).

    python -m pytest -q tests/benchmarks/test_benchmarks_logprobs.py
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hermesflow_fast.benchmarks.measure import DTYPES, MB
from hermesflow_fast.ops import FusedLinearDPOLoss, dpo_loss, fused_linear_dpo_loss, linear_logprobs, reference
from hermesflow_fast.ops.fused_dpo import _pair_chunks
from hermesflow_fast.ops.logprobs import default_chunk_rows

BETA = 0.1
IGNORE_INDEX = -100
IGNORE_FRAC = 0.05
NAIVE_EXTRA_MIN = 2.96  # naive's extra ÷ its (T_policy, V) fp32 logits: the smallest measured from 2048 tokens up
# (CPU fp32, bench/results/logprobs.csv: 2.96–3.72 over H 1024/2048, V 32768/58498/151936, 2048–8192 tokens)

# ---------------------------------------------------------------------------------------------------------------------
# problem and inputs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    tokens: int  # T_policy: policy tokens per step, chosen + rejected
    seq: int  # tokens per sequence
    H: int
    V: int
    dtype: str = "fp32"
    device: str = "cpu"
    bias: bool = True
    seed: int = 0

    @classmethod
    def make(cls, tokens: int, seq: int, H: int, V: int, **kw) -> Problem:
        """Shorten ``seq`` to tokens // 2 when tokens < 2·seq (one pair); tokens must be a multiple of 2·seq."""
        seq = min(seq, tokens // 2)
        if seq < 1 or tokens % (2 * seq):
            raise ValueError(f"--tokens {tokens} must be a multiple of 2·seq = {2 * seq} (chosen + rejected)")
        return cls(tokens=tokens, seq=seq, H=H, V=V, **kw)

    @property
    def pairs(self) -> int:
        return self.tokens // (2 * self.seq)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class Inputs:
    x: torch.Tensor  # (2B, T, H) policy hidden, requires grad; chosen rows over rejected rows
    w: torch.Tensor  # (V, H) head weight, requires grad
    b: torch.Tensor | None  # (V,) head bias, requires grad
    y: torch.Tensor  # (2B, T) targets, ~5% IGNORE_INDEX
    xr: torch.Tensor  # (2B, T, H) reference hidden, no grad

    def zero_grads(self) -> None:
        for t in (self.x, self.w, self.b):
            if t is not None:
                t.grad = None

    def grad_bytes(self) -> int:
        """Bytes of hidden.grad + weight.grad + bias.grad (autograd makes them in the input dtype)."""
        return sum(t.numel() * t.element_size() for t in (self.x, self.w, self.b) if t is not None)

    @property
    def valid_rows(self) -> int:
        return int((self.y != IGNORE_INDEX).sum())


def build_inputs(p: Problem) -> Inputs:
    """Deterministic inputs; logits ~ N(0, 1), reference hidden = policy hidden + 0.1 noise (so z = β(a − r) ~ 0.1)."""
    dev, dt = torch.device(p.device), p.torch_dtype
    g = torch.Generator(device=dev).manual_seed(p.seed)
    s, t = 2 * p.pairs, p.seq
    x = torch.randn(s, t, p.H, generator=g, device=dev)
    xr = (x + 0.1 * torch.randn(s, t, p.H, generator=g, device=dev)).to(dt)
    x = x.to(dt).requires_grad_()
    w = (torch.randn(p.V, p.H, generator=g, device=dev) / math.sqrt(p.H)).to(dt).requires_grad_()
    b = (0.1 * torch.randn(p.V, generator=g, device=dev)).to(dt).requires_grad_() if p.bias else None
    y = torch.randint(0, p.V, (s, t), generator=g, device=dev)
    y[torch.rand(s, t, generator=g, device=dev) < IGNORE_FRAC] = IGNORE_INDEX
    return Inputs(x=x, w=w, b=b, y=y, xr=xr)


def planned_chunks(p: Problem, seed: int = 0) -> tuple[int, list[int]]:
    """(scored rows, rows of each chunk of ours' default chunking) for a problem, from a draw of its target mask
    alone (the same ~5% ignored as build_inputs, not the same draw): the op's own chunker on the op's own budget."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(2 * p.pairs, p.seq, generator=g) >= IGNORE_FRAC
    counts = keep.sum(1).tolist()
    rows = sum(counts)
    chunks = _pair_chunks(counts, p.pairs, default_chunk_rows(rows, p.V, torch.device(p.device)), None)
    n = p.pairs
    return rows, [sum(counts[p0:p1]) + sum(counts[n + p0 : n + p1]) for p0, p1 in chunks]


def plan_table(problems: list[Problem]) -> str:
    """The chunking ours will use at each point and the modelled extras (see the module docstring)."""
    cols = (f"{'H':>5} {'V':>7} {'tokens':>6} {'rows':>6} {'chunks':>6} {'largest':>7} {'chunk MB':>9} "
            f"{'ours MB':>8} {'naive MB':>9} {'ours÷naive':>10}")
    lines = ["ours' default chunking (whole pairs, default_chunk_rows) and modelled extras, fp32 logits:", cols,
             "-" * len(cols)]
    for p in problems:
        rows, chunks = planned_chunks(p)
        big = max(chunks)
        chunk_mb = big * p.V * 4 / MB
        ours = chunk_mb + 2 * big * p.H * 4 / MB
        naive = NAIVE_EXTRA_MIN * p.tokens * p.V * 4 / MB
        lines.append(f"{p.H:>5} {p.V:>7} {p.tokens:>6} {rows:>6} {len(chunks):>6} {big:>7} {chunk_mb:>9,.0f} "
                     f"{ours:>8,.0f} {naive:>9,.0f} {ours / naive:>10.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# providers: each builds, from the inputs, a forward fn returning the scalar loss (None: nothing to backprop)
# ---------------------------------------------------------------------------------------------------------------------

Forward = Callable[[], "torch.Tensor | None"]


def _detached(inp: Inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference head: the policy's own tensors, detached (no second weight is allocated)."""
    return inp.w.detach(), None if inp.b is None else inp.b.detach()


def _gemm_floor(inp: Inputs) -> Forward:
    h = inp.x.shape[-1]
    keep = (inp.y != IGNORE_INDEX).reshape(-1)
    xv = inp.x.detach().reshape(-1, h)[keep]  # (R, H), built outside the timed region
    xrv = inp.xr.reshape(-1, h)[keep]
    w = inp.w.detach()
    g = torch.randn(xv.shape[0], w.shape[0], dtype=w.dtype, device=w.device)  # (R, V) stand-in for dlogits

    def run() -> None:
        torch.mm(xv, w.t())  # policy logits
        torch.mm(g, w)  # dX
        torch.mm(g.t(), xv)  # dW
        torch.mm(xrv, w.t())  # reference logits

    return run


def _naive(inp: Inputs) -> Forward:
    rw, rb = _detached(inp)
    return lambda: reference.fused_linear_dpo(inp.w, inp.x, inp.y, inp.b, inp.xr, rw, rb, beta=BETA)[0]


def _dpo_of(seq_logps: Callable, inp: Inputs, rw: torch.Tensor, rb: torch.Tensor | None) -> Forward:
    """The DPO step of a provider that computes per-sequence log-probs ``seq_logps(hidden, weight, bias)``: the
    policy's with grad, the reference's without, chosen rows first."""
    n = inp.x.shape[0] // 2

    def run():
        lp = seq_logps(inp.x, inp.w, inp.b)
        with torch.no_grad():
            ref = seq_logps(inp.xr, rw, rb)
        return dpo_loss(lp[:n], lp[n:], ref[:n], ref[n:], beta=BETA)[0]

    return run


def _trl(inp: Inputs) -> Forward:
    keep = inp.y != IGNORE_INDEX
    safe = inp.y.masked_fill(~keep, 0)  # TRL: labels[~loss_mask] = 0, then mask the per-token log-probs
    rw, rb = _detached(inp)

    def seq_logps(hidden, weight, bias):
        logits = F.linear(hidden, weight, bias)  # (2B, T, V), all of it
        tok = reference.selective_logprobs(logits, safe)  # (2B, T), one logsumexp per sequence
        return (tok * keep).sum(-1)

    return _dpo_of(seq_logps, inp, rw, rb)


def _liger(compiled: bool) -> Callable[[Inputs], Forward]:
    def build(inp: Inputs) -> Forward:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        fn = LigerFusedLinearDPOLoss(ignore_index=IGNORE_INDEX, beta=BETA, compiled=compiled, use_ref_model=True)
        rw, rb = _detached(inp)
        return lambda: fn(inp.w, inp.x, inp.y, inp.b, inp.xr, rw, rb)[0]

    return build


def _torch_lce(inp: Inputs) -> Forward:
    s, t, h = inp.x.shape
    y = inp.y.reshape(-1)
    opts = torch.nn.LinearCrossEntropyOptions()  # chunked path; options=None would materialize the logits
    rw, rb = _detached(inp)

    def seq_logps(hidden, weight, bias):
        nll = F.linear_cross_entropy(
            hidden.reshape(-1, h), weight, y, linear_bias=bias, reduction="none", ignore_index=IGNORE_INDEX,
            options=opts,
        )  # (N,), 0 at ignored rows
        return -nll.float().view(s, t).sum(-1)

    return _dpo_of(seq_logps, inp, rw, rb)


def _ours(inp: Inputs) -> Forward:
    fn = FusedLinearDPOLoss(ignore_index=IGNORE_INDEX, beta=BETA, backend="chunked")
    rw, rb = _detached(inp)
    return lambda: fn(inp.w, inp.x, inp.y, inp.b, inp.xr, rw, rb)[0]


def _ours_twopass(inp: Inputs) -> Forward:
    rw, rb = _detached(inp)
    return lambda: fused_linear_dpo_loss(
        inp.x, inp.w, inp.y, inp.b, inp.xr, rw, rb, ignore_index=IGNORE_INDEX, beta=BETA, backend="twopass"
    )[0]


def _ours_twopass_atomic(inp: Inputs) -> Forward:
    """ours_twopass with the Triton backward's former default, dw_mode="atomic" (fp32 dx / dW buffers filled by
    atomics), for comparison with the owned backward that ours_twopass runs for 16-bit inputs. On CPU (the torch
    path, which has no dw_mode) it is ours_twopass."""
    rw, rb = _detached(inp)

    def seq_logps(hidden, weight, bias):
        return linear_logprobs(hidden, weight, inp.y, bias, IGNORE_INDEX, dw_mode="atomic").sum(-1)

    return _dpo_of(seq_logps, inp, rw, rb)


PROVIDERS: dict[str, Callable[[Inputs], Forward]] = {
    "gemm_floor": _gemm_floor,
    "naive": _naive,
    "trl": _trl,
    "liger": _liger(compiled=False),
    "liger_compiled": _liger(compiled=True),
    "torch_lce": _torch_lce,
    "ours": _ours,
    "ours_twopass": _ours_twopass,
    "ours_twopass_atomic": _ours_twopass_atomic,
}
DEFAULT_PROVIDERS = ("gemm_floor", "naive", "trl", "liger", "torch_lce", "ours", "ours_twopass")
TIME_ONLY = ("gemm_floor",)  # no loss, no memory row
RUN_ORDER = ("gemm_floor", "ours", "ours_twopass", "ours_twopass_atomic", "torch_lce", "liger", "liger_compiled",
             "trl", "naive")


def provider_available(name: str) -> tuple[bool, str]:
    if name.startswith("liger"):
        try:
            import liger_kernel.chunked_loss  # noqa: F401
        except Exception as e:  # ImportError, or a broken install
            return False, f"liger_kernel.chunked_loss is not importable ({type(e).__name__}: {e})"
    if name == "torch_lce" and not hasattr(F, "linear_cross_entropy"):
        return False, f"torch {torch.__version__} has no F.linear_cross_entropy"
    return True, ""


def estimate_bytes(name: str, p: Problem) -> int:
    """Rough peak of one measurement process: inputs + grads + what the provider holds at its peak.

    Factors on L (fp32 logits of all policy rows) are rounded up from CPU fp32 measurements: naive and trl
    needed 2.7 L extra at H=256, V=16000, 2048 tokens (L = 131 MB); ours 120 MB and liger 125 MB there. On CUDA the
    twopass providers use the Triton backward's model (``kernels.linear_logprobs.backward_extra_bytes``) + 64 MB.
    """
    elt = p.torch_dtype.itemsize
    n, h, v = p.tokens, p.H, p.V
    inputs = 2 * n * h * elt + v * h * elt + v * elt
    grads = n * h * elt + v * h * elt + v * elt
    logits = n * v * 4
    chunk = max(planned_chunks(p)[1]) * v * 4
    held = {
        "gemm_floor": 3 * n * v * elt,
        "naive": 4 * logits,
        "trl": 4 * logits,
        "liger": 16 * p.seq * v * 4 + 3 * v * h * 4,
        "liger_compiled": 16 * p.seq * v * 4 + 3 * v * h * 4,
        "torch_lce": logits // 2 + 2 * v * h * 4,
        "ours": 4 * chunk + 2 * v * h * 4,
        "ours_twopass": 4 * chunk + 2 * v * h * 4,
        "ours_twopass_atomic": 4 * chunk + 2 * v * h * 4,
    }[name]
    if name.startswith("ours_twopass") and p.device == "cuda":  # the Triton backward's own model
        from hermesflow_fast.kernels.linear_logprobs import backward_extra_bytes

        mode = "atomic" if name == "ours_twopass_atomic" else "auto"
        held = backward_extra_bytes(n, h, v, p.torch_dtype, bias=p.bias, dw_mode=mode) + 64 * MB
    return inputs + grads + held + 400 * MB  # + torch itself


def check_providers(providers, device: str = "cpu", rtol: float = 1e-4) -> dict[str, float]:
    """Every provider's loss, and its hidden/weight/bias gradients, against ``naive`` at a tiny fp32 shape.

    Raises AssertionError naming the providers that disagree by more than ``rtol`` (relative to the largest
    magnitude of the naive value). Returns the losses.
    """
    inp = build_inputs(Problem.make(tokens=128, seq=32, H=64, V=500, device=device))
    names = ["naive"] + [n for n in providers if n not in TIME_ONLY and n != "naive"]
    losses, grads = {}, {}
    for name in names:
        inp.zero_grads()
        loss = PROVIDERS[name](inp)()
        loss.backward()
        losses[name] = float(loss.detach())
        grads[name] = [t.grad.detach().clone() for t in (inp.x, inp.w, inp.b) if t is not None]
    bad = []
    base = losses["naive"]
    for name in names[1:]:
        if abs(losses[name] - base) > rtol * abs(base):
            bad.append(f"{name}: loss {losses[name]:.8g} vs naive {base:.8g}")
        for label, g, g0 in zip(("hidden", "weight", "bias"), grads[name], grads["naive"], strict=True):
            err, scale = (g.float() - g0.float()).abs().max().item(), g0.float().abs().max().item()
            if err > rtol * scale:
                bad.append(f"{name}: {label}.grad max err {err:.3g} vs max |grad| {scale:.3g}")
    if bad:
        raise AssertionError("providers disagree with naive at a tiny shape:\n  " + "\n  ".join(bad))
    return losses
