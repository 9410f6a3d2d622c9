"""The owned backward of kernels/linear_logprobs.py (dw_mode="owned"): every dx / dW / db tile summed in fp32 and
written once, no atomics, no fp32 (V, H) buffer; its plan and memory model.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q -m interpret tests/kernels/test_linear_logprobs_owned.py
    .venv/bin/python -m pytest -q -m "not interpret" tests/kernels/test_linear_logprobs_owned.py   (model, plan)

Interpreter tests run fp32 (against float64, tight) and bf16 (within twice torch's own bf16 error, flash-attn's
rule; the kernels widen bf16 MMA operands to fp32 and round bf16 stores by hand under the interpreter only, see
`_mma` and `_cast`). Plans are given explicitly where a test needs a path: the default plan of these tiny shapes is
the two-pass one (their fp32 dx accumulator does not fit 0.18× of their inputs + gradients).
"""

import gc
import weakref

import pytest
import torch
from hermesflow_fast.kernels import linear_logprobs as K
from test_linear_logprobs import (
    FP32_TOL,
    assert_close,
    assert_needed_grads,
    assert_within_twice_torch_error,
    make_inputs,
    reference_grads,
    torch_lowp_grads,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

pytestmark = pytest.mark.skipif(not K.HAS_TRITON, reason="triton is not installed")
interpret = pytest.mark.interpret

SHOW_O = (16384, 2048, 58498)  # N, H, V of the H100 measurement: bf16, Show-o's head


def targets_with_holes(n: int, v: int, ignore_index: int = -100) -> torch.Tensor:
    """~25% ignored, a whole 16-row block ignored, and the last vocab column as a target (the partial last tile)."""
    y = torch.randint(0, v, (n,))
    y[torch.rand(n) < 0.25] = ignore_index
    y[16:32] = ignore_index
    y[1] = v - 1
    return y


def grads_with_zeros(n: int) -> torch.Tensor:
    """Upstream grads with exact zeros (dead rows that are not ignored), one of them in a live block."""
    g = torch.randn(n)
    g[torch.rand(n) < 0.2] = 0.0
    g[2] = 0.0
    return g


def owned(x, w, y, g, b, plan=None, needs=(True, True, True), cfg=None, ignore_index=-100):
    cfg = cfg or K._launch_config(x.shape[0], x.dtype)
    _, lse = K._forward(x, w, y, b, ignore_index, cfg)
    return K._backward(x, w, y, lse, g, b, ignore_index, needs, cfg, "owned", plan)


# ---------------------------------------------------------------------------------------------------------------------
# Interpreter: values
# ---------------------------------------------------------------------------------------------------------------------

PLANS = {
    "default": None,  # two passes at these shapes
    "one_pass": K.OwnedPlan(vocab_chunk=64, row_chunk=0, dx_in_vocab_pass=True),  # 2 chunks of 123 columns
    "two_pass_small": K.OwnedPlan(vocab_chunk=32, row_chunk=16, dx_in_vocab_pass=False),  # 4 × 32 cols, 3 × 16 rows
    "whole": K.OwnedPlan(vocab_chunk=10**6, row_chunk=10**6, dx_in_vocab_pass=False),  # one chunk each
}


@interpret
@pytest.mark.parametrize("plan", PLANS, ids=list(PLANS))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_owned_fp32_matches_float64(plan, bias):
    """N = 47 (not a multiple of BLOCK_M 16), V = 123 (not a multiple of BLOCK_N 32), H = 31; ignored rows, a fully
    ignored row block, zero grads."""
    n, h, v = 47, 31, 123
    x, w, b = make_inputs(n, h, v, bias)
    y = targets_with_holes(n, v)
    g = grads_with_zeros(n)
    _, ref_dx, ref_dw, ref_db = reference_grads(x, w, b, y, g, -100)
    dx, dw, db = owned(x, w, y, g, b, PLANS[plan])
    assert dx.dtype == dw.dtype == torch.float32 and (db is None) == (not bias)
    assert_close(dx, ref_dx, **FP32_TOL)
    assert_close(dw, ref_dw, **FP32_TOL)
    if bias:
        assert_close(db, ref_db, **FP32_TOL)
    dead = (y == -100) | (g == 0)
    assert (dx[dead] == 0).all()


@interpret
@pytest.mark.parametrize("plan", ["default", "one_pass"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_owned_bf16_within_twice_torch_error(plan, bias):
    n, h, v = 47, 48, 123
    x, w, b = make_inputs(n, h, v, bias, dtype=torch.bfloat16)
    y = targets_with_holes(n, v)
    g = grads_with_zeros(n)
    ref = reference_grads(x, w, b, y, g, -100)
    torch_lowp = torch_lowp_grads(x, w, b, y, g, -100)
    cfg = K._launch_config(n, x.dtype)
    logp, lse = K._forward(x, w, y, b, -100, cfg)
    dx, dw, db = K._backward(x, w, y, lse, g, b, -100, (True, True, True), cfg, "owned", PLANS[plan])
    assert dx.dtype == dw.dtype == torch.bfloat16 and (db is None or db.dtype == torch.bfloat16)
    assert_within_twice_torch_error((logp, dx, dw, db), torch_lowp, ref)
    # the atomic kernel rounds dz to bf16 the same way and sums in fp32: the two agree to bf16 rounding of the sums
    adx, adw, adb = K._backward(x, w, y, lse, g, b, -100, (True, True, True), cfg, "atomic")
    for got, other in ((dx, adx), (dw, adw), (db, adb)):
        if got is not None:
            torch.testing.assert_close(got.float(), other.float(), atol=1e-2, rtol=1.6e-2)


@interpret
def test_owned_fp32_medium_shape_and_auto_mode():
    """A 64 × 96 × 1000 head through the public backward: "owned" matches float64, and "auto" is "atomic" for fp32
    inputs (the same numbers, to fp32 summation order)."""
    n, h, v = 64, 96, 1000
    x, w, b = make_inputs(n, h, v, bias=True)
    y = targets_with_holes(n, v)
    g = grads_with_zeros(n)
    _, *ref = reference_grads(x, w, b, y, g, -100)
    _, lse = K.linear_logprobs_forward(x, w, y, b)
    got = K.linear_logprobs_backward(x, w, y, lse, g, b, dw_mode="owned")
    for a, r in zip(got, ref, strict=True):
        assert_close(a, r, **FP32_TOL)
    assert K.resolve_dw_mode("auto", torch.float32) == "atomic"
    assert K.resolve_dw_mode("auto", torch.bfloat16) == K.resolve_dw_mode("auto", torch.float16) == "owned"


@interpret
@pytest.mark.parametrize(
    "needs", [(True, False, False), (False, True, False), (False, False, True), (False, True, True),
              (True, True, False), (False,) * 3],
    ids=["dx", "dw", "db", "dw_db", "dx_dw", "none"],
)
@pytest.mark.parametrize("plan", ["default", "one_pass"])
def test_owned_needs_input_grad(needs, plan):
    n, h, v = 21, 24, 70
    x, w, b = make_inputs(n, h, v, bias=True)
    y = targets_with_holes(n, v)
    g = torch.randn(n)
    _, *ref = reference_grads(x, w, b, y, g, -100)
    got = owned(x, w, y, g, b, PLANS[plan], needs=needs)
    assert_needed_grads(needs, got, ref)


@interpret
def test_owned_is_deterministic_and_plan_independent():
    """No atomics: a plan's result is bitwise the same run to run, and two-pass plans with other chunks sum every
    element in the same order, so they agree bitwise too (the one-pass plan's dx sums in another order)."""
    n, h, v = 40, 24, 100
    x, w, b = make_inputs(n, h, v, bias=True)
    y = targets_with_holes(n, v)
    g = grads_with_zeros(n)
    first = owned(x, w, y, g, b, PLANS["two_pass_small"])
    again = owned(x, w, y, g, b, PLANS["two_pass_small"])
    whole = owned(x, w, y, g, b, PLANS["whole"])
    for a, c, d in zip(first, again, whole, strict=True):
        assert torch.equal(a, c) and torch.equal(a, d)


@interpret
@pytest.mark.parametrize("plan", ["default", "one_pass"])
def test_owned_dead_rows_with_nan_hidden_add_nothing(plan):
    """Rows without upstream grad (3: g = 0; 7: ignored) add exactly nothing, NaN hidden state or not."""
    n, h, v = 20, 24, 70
    x, w, _ = make_inputs(n, h, v, bias=False)
    y = torch.randint(0, v, (n,))
    x[3, 5] = float("nan")
    x[7] = float("nan")
    y[7] = -100
    g = torch.randn(n)
    g[3] = 0.0
    _, lse = K.linear_logprobs_forward(x, w, y)
    cfg = K._launch_config(n, x.dtype)
    dx, dw, _ = K._backward(x, w, y, lse, g, None, -100, (True, True, False), cfg, "owned", PLANS[plan])
    clean = torch.ones(n, dtype=torch.bool)
    clean[[3, 7]] = False
    _, ref_dx, ref_dw, _ = reference_grads(x[clean], w, None, y[clean], g[clean], -100)
    assert (dx[~clean] == 0).all()
    assert_close(dx[clean], ref_dx, **FP32_TOL)
    assert_close(dw, ref_dw, **FP32_TOL)
    g[3] = 1.0  # with a grad, the NaN row poisons its own dx row and every column of dW, as in torch
    dx, dw, _ = K._backward(x, w, y, lse, g, None, -100, (True, True, False), cfg, "owned", PLANS[plan])
    assert torch.isnan(dx[3]).all() and torch.isfinite(dx[clean]).all() and torch.isnan(dw).any(1).all()


@interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_autograd_function_owned_end_to_end(dtype):
    n, h, v = 30, 32, 90
    x, w, b = make_inputs(n, h, v, bias=True, dtype=dtype)
    y = targets_with_holes(n, v, ignore_index=-1)
    g = grads_with_zeros(n)
    ref = reference_grads(x, w, b, y, g, -1)
    lowp = torch_lowp_grads(x, w, b, y, g, -1)
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    logp = K.LinearLogprobsFunction.apply(x, w, y, b, -1, "owned")
    (logp * g).sum().backward()
    got = (logp.detach(), x.grad, w.grad, b.grad)
    if dtype == torch.float32:
        for a, r in zip(got, ref, strict=True):
            assert_close(a, r, **FP32_TOL)
    else:
        assert_within_twice_torch_error(got, lowp, ref)


@interpret
def test_owned_empty_batch_and_unknown_mode():
    x, w, b = make_inputs(0, 8, 30, bias=True)
    y = torch.zeros(0, dtype=torch.int64)
    logp, lse = K.linear_logprobs_forward(x, w, y, b)
    dx, dw, db = K.linear_logprobs_backward(x, w, y, lse, torch.zeros(0), b, dw_mode="owned")
    assert dx.shape == (0, 8) and (dw == 0).all() and (db == 0).all()
    with pytest.raises(ValueError, match="dw_mode"):
        K.LinearLogprobsFunction.apply(x, w, y, b, -100, "fp32")


# ---------------------------------------------------------------------------------------------------------------------
# Interpreter: what the backward allocates
# ---------------------------------------------------------------------------------------------------------------------


class AllocationTracker(TorchDispatchMode):
    """Every storage an op creates while active (ops whose outputs alias nothing: not views, not in-place, not out=),
    with its shape and dtype, and the live / peak bytes of those storages (freed ones leave through a finalizer).

    Triton's interpreter keeps its kernels' arguments in reference cycles until the next garbage collection, so
    the tracker collects before it counts a new storage: what a CUDA run frees by reference count is freed here
    before the next allocation is added."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.created: list[tuple[tuple[int, ...], torch.dtype]] = []
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self._sizes:
                continue
            gc.collect()
            self._sizes[key] = size
            self.created.append((tuple(t.shape), t.dtype))
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)


def _tracked_backward(x, w, y, g, b, dw_mode, plan=None, needs=(True, True, True)):
    cfg = K._launch_config(x.shape[0], x.dtype)
    _, lse = K._forward(x, w, y, b, -100, cfg)
    with AllocationTracker() as tracker:
        grads = K._backward(x, w, y, lse, g, b, -100, needs, cfg, dw_mode, plan)
        grad_bytes = sum(t.numel() * t.element_size() for t in grads if t is not None)
        extra_peak = tracker.peak - grad_bytes
    return tracker, extra_peak, cfg


@interpret
@pytest.mark.parametrize(
    "dtype,plan",
    [(torch.bfloat16, "default"), (torch.bfloat16, "one_pass"), (torch.float32, "default"),
     (torch.float16, "two_pass_small")],
    ids=["bf16_default", "bf16_one_pass", "fp32_default", "fp16_two_pass"],
)
def test_owned_allocates_no_vh_fp32_buffer_and_its_model_holds(dtype, plan):
    """The owned backward never creates an fp32 tensor of V·H elements or more (for fp32 inputs: none but dW itself),
    and its measured peak beyond the returned gradients is what `backward_extra_bytes` says (the model is exact up
    to a few per-row bytes)."""
    n, h, v = 47, 48, 123
    x, w, b = make_inputs(n, h, v, bias=True, dtype=dtype)
    y = targets_with_holes(n, v)
    g = grads_with_zeros(n)
    tracker, extra_peak, cfg = _tracked_backward(x, w, y, g, b, "owned", PLANS[plan])
    big_fp32 = [(s, d) for s, d in tracker.created if d == torch.float32 and torch.Size(s).numel() >= v * h]
    assert big_fp32 == ([((v, h), torch.float32)] if dtype == torch.float32 else []), big_fp32  # fp32: dW itself
    assert ((v, h), dtype) in tracker.created  # dW, created once in the weight's dtype
    model = K.backward_extra_bytes(n, h, v, dtype, dw_mode="owned", plan=PLANS[plan], cfg=cfg)
    assert model - K._fixed_bytes(n) <= extra_peak <= model, (extra_peak, model)


@interpret
def test_atomic_allocates_the_fp32_buffers_the_model_counts():
    """The detector sees the atomic mode's fp32 (V, H) buffer, and the model counts it (bf16: 1.0× grads extra)."""
    n, h, v = 20, 24, 70
    x, w, b = make_inputs(n, h, v, bias=True, dtype=torch.bfloat16)
    y = targets_with_holes(n, v)
    tracker, extra_peak, cfg = _tracked_backward(x, w, y, torch.randn(n), b, "atomic")
    assert ((v, h), torch.float32) in tracker.created
    model = K.backward_extra_bytes(n, h, v, torch.bfloat16, dw_mode="atomic", cfg=cfg)
    assert model - K._fixed_bytes(n) <= extra_peak <= model, (extra_peak, model)


# ---------------------------------------------------------------------------------------------------------------------
# CPU: the plan, the memory model and the FLOP count (pure Python)
# ---------------------------------------------------------------------------------------------------------------------

H100_CFG = K.LaunchConfig(128, 128, 64, block_h=128)  # the 16-bit GPU tiles, whatever TRITON_INTERPRET says


def test_show_o_shape_bf16_peak_within_a_fifth_of_inputs_and_grads():
    """N 16,384, H 2048, V 58,498, bf16: the owned backward's peak extra ≤ 0.2× inputs + gradients (x, W, b, dx,
    dW, db = 613.7 MB), where the atomic one needs 1.0× (its fp32 dx and dW)."""
    n, h, v = SHOW_O
    io = K.inputs_and_grads_bytes(n, h, v, torch.bfloat16)
    assert io == 2 * 2 * (n * h + v * h + v)
    extra = K.backward_extra_bytes(n, h, v, torch.bfloat16, dw_mode="owned", cfg=H100_CFG)
    assert extra <= 0.2 * io, extra / io
    atomic = K.backward_extra_bytes(n, h, v, torch.bfloat16, dw_mode="atomic")
    assert atomic >= io  # fp32 dx + dW + db = 2× the bf16 gradients = the inputs + gradients
    plan = K.plan_owned_backward(n, h, v, torch.bfloat16, cfg=H100_CFG)
    assert not plan.dx_in_vocab_pass  # the fp32 (N, H) accumulator alone is 134 MB = 0.219×: two passes
    assert 4 * n * h > 0.2 * io
    assert K.backward_gemm_flops(n, h, v, dw_mode="owned", plan=plan) == 4 * 2 * n * h * v
    assert K.backward_gemm_flops(n, h, v, dw_mode="atomic") == 3 * 2 * n * h * v


@pytest.mark.parametrize("h", [1024, 2048, 4096])
@pytest.mark.parametrize("v", [32768, 58498, 151936])
@pytest.mark.parametrize("n", [64, 1000, 2048, 4096, 8192, 16384, 32768])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_plans_fit_the_budget_in_whole_tiles(n, h, v, dtype):
    cfg = K._launch_config(n, dtype) if not K._interpreting() else H100_CFG
    plan = K.plan_owned_backward(n, h, v, dtype, cfg=cfg)
    io = K.inputs_and_grads_bytes(n, h, v, dtype)
    extra = K.backward_extra_bytes(n, h, v, dtype, dw_mode="owned", plan=plan, cfg=cfg)
    assert extra <= K.BUDGET_FRACTION * io
    assert plan.vocab_chunk == v or plan.vocab_chunk % cfg.block_n == 0
    assert 0 < plan.vocab_chunk <= v
    if plan.dx_in_vocab_pass:
        assert plan.row_chunk == 0 and min(plan.vocab_chunk, v) >= min(v, K.ONE_PASS_MIN_COLS)
    else:
        assert 0 < plan.row_chunk <= n and (plan.row_chunk == n or plan.row_chunk % cfg.block_m == 0)


def test_plan_one_pass_below_the_accumulator_threshold():
    """At Show-o's head the one-pass plan (3 GEMMs) holds up to ~9.6k tokens, then the row pass takes dx (4)."""
    h, v = SHOW_O[1:]
    one = [n for n in range(1024, 16385, 1024)
           if K.plan_owned_backward(n, h, v, torch.bfloat16, cfg=H100_CFG).dx_in_vocab_pass]
    assert one == list(range(1024, 9217, 1024))


def test_plan_without_dx_or_without_dw():
    h, v = SHOW_O[1:]
    only_dx = K.plan_owned_backward(4096, h, v, torch.bfloat16, needs=(True, False, False), cfg=H100_CFG)
    assert only_dx.vocab_chunk == 0 and only_dx.row_chunk > 0 and not only_dx.dx_in_vocab_pass
    frozen_x = K.plan_owned_backward(4096, h, v, torch.bfloat16, needs=(False, True, True), cfg=H100_CFG)
    assert frozen_x.row_chunk == 0 and not frozen_x.dx_in_vocab_pass and frozen_x.vocab_chunk > 0
    assert K.backward_gemm_flops(4096, h, v, plan=only_dx, needs=(True, False, False)) == 2 * 2 * 4096 * h * v
    assert K.backward_gemm_flops(4096, h, v, plan=frozen_x, needs=(False, True, True)) == 2 * 2 * 4096 * h * v


def test_explicit_budget_and_tiny_budget():
    n, h, v = SHOW_O
    big = K.plan_owned_backward(n, h, v, torch.bfloat16, budget_bytes=10**12, cfg=H100_CFG)
    assert big == K.OwnedPlan(v, 0, True)  # everything fits: one chunk, one pass
    tiny = K.plan_owned_backward(n, h, v, torch.bfloat16, budget_bytes=0, cfg=H100_CFG)
    assert tiny == K.OwnedPlan(H100_CFG.block_n, H100_CFG.block_m, False)  # a tile-wide chunk at the least


def test_dw_modes_agree_between_the_op_and_the_kernels():
    from hermesflow_fast.ops import logprobs

    assert logprobs.DW_MODES == K.DW_MODES
    with pytest.raises(ValueError, match="dw_mode"):
        K.resolve_dw_mode("fast", torch.bfloat16)
