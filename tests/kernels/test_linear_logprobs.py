"""kernels/linear_logprobs.py against the float64 reference (hermesflow_fast.ops.reference.linear_logprobs).

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q -m interpret tests/kernels/test_linear_logprobs.py   (CPU)
    .venv/bin/python -m pytest -q -m gpu tests/kernels/test_linear_logprobs.py                           (CUDA)

Interpreter tests carry ``@interpret`` one by one rather than a module-wide ``pytestmark``: a module mark would also
tag the GPU test, which conftest then skips in every run without TRITON_INTERPRET=1, i.e. in `make test-gpu`.
The interpreter is slow, so its shapes are small and fp32, plus fp16 and bf16 cases (the triton 3.9 interpreter's
bf16 `tl.dot` multiplies raw uint16 bits and its fp32 -> bf16 cast truncates, so under the interpreter the kernels
widen bf16 MMA operands to fp32 and round bf16 stores by hand: `_mma`, `_cast`). Both backward modes run here; the
owned mode's own tests (plans, allocations, memory model) are in test_linear_logprobs_owned.py.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from hermesflow_fast.kernels import linear_logprobs as K

from hermesflow_fast.ops.reference import linear_logprobs as reference

pytestmark = pytest.mark.skipif(not K.HAS_TRITON, reason="triton is not installed")
interpret = pytest.mark.interpret

# (N, H, V): a small realistic head, two odd ones (nothing divides a tile), a single partial row block.
SHAPES = [(64, 96, 1000), (47, 31, 123), (5, 64, 300)]
FP32_TOL = {"atol": 1e-4, "rtol": 1e-4}


def make_targets(n: int, v: int, ignore_index: int) -> torch.Tensor:
    """Random targets, ~25% ignored, and rows [16, 32) (a whole BLOCK_M=16 block under the interpreter) ignored."""
    y = torch.randint(0, v, (n,))
    y[torch.rand(n) < 0.25] = ignore_index
    y[16:32] = ignore_index
    return y


def make_inputs(n, h, v, bias, dtype=torch.float32, device="cpu"):
    x = torch.randn(n, h, device=device).to(dtype)
    w = (torch.randn(v, h, device=device) / h**0.5 * 2).to(dtype)  # logits of std ~2, a peaked softmax
    b = torch.randn(v, device=device).to(dtype) if bias else None
    return x, w, b


def reference_grads(x, w, b, y, g, ignore_index):
    """float64 logp and (dx, dW, db) of Σ g·logp, by autograd through the reference."""
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    bd = b.double().requires_grad_() if b is not None else None
    logp = reference(xd, wd, y, bd, ignore_index)
    (logp * g.double()).sum().backward()
    return logp.detach(), xd.grad, wd.grad, bd.grad if bd is not None else None


def assert_close(actual, expected, **tol):
    torch.testing.assert_close(actual.double(), expected.double(), **tol)


# ---------------------------------------------------------------------------------------------------------------------
# Interpreter (CPU, fp32)
# ---------------------------------------------------------------------------------------------------------------------


@interpret
@pytest.mark.parametrize("ignore_index", [-100, 7])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward_match_reference(shape, bias, ignore_index):
    n, h, v = shape
    x, w, b = make_inputs(n, h, v, bias)
    y = make_targets(n, v, ignore_index)
    g = torch.randn(n)
    ref_logp, ref_dx, ref_dw, ref_db = reference_grads(x, w, b, y, g, ignore_index)

    logp, lse = K.linear_logprobs_forward(x, w, y, b, ignore_index)
    assert logp.dtype == lse.dtype == torch.float32
    assert_close(logp, ref_logp, **FP32_TOL)
    logits = x.double() @ w.double().t() + (b.double() if bias else 0)
    assert_close(lse, torch.logsumexp(logits, -1), **FP32_TOL)  # every row, ignored ones too

    dx, dw, db = K.linear_logprobs_backward(x, w, y, lse, g, b, ignore_index)
    assert dx.dtype == dw.dtype == torch.float32 and (db is None) == (not bias)
    assert_close(dx, ref_dx, **FP32_TOL)
    assert_close(dw, ref_dw, **FP32_TOL)
    if bias:
        assert_close(db, ref_db, **FP32_TOL)
    ignored = y == ignore_index
    assert ignored.any() and (logp[ignored] == 0).all() and (dx[ignored] == 0).all()


@interpret
@pytest.mark.parametrize(
    "cfg",
    [
        K.LaunchConfig(16, 16, 16, splits=1),  # one split: the whole vocab in one program per row block
        K.LaunchConfig(16, 16, 16, splits=3),  # uneven splits: 8 tiles -> 3 + 3 + 2
        K.LaunchConfig(16, 16, 16, splits=100),  # more splits than tiles: clamped to 8, no empty split
        K.LaunchConfig(32, 16, 32, group_m=1),  # no swizzle, BLOCK_M 32
        K.LaunchConfig(16, 32, 16, group_m=2, block_h=16),  # 3 row blocks: the last group is partial; 2 H blocks
    ],
    ids=["split1", "split3", "split_clamped", "bm32_nogroup", "partial_group"],
)
@pytest.mark.parametrize("dw_mode", ["atomic", "owned"])
def test_launch_configs_agree(cfg, dw_mode):
    n, h, v = 47, 31, 123
    x, w, b = make_inputs(n, h, v, bias=True)
    y = make_targets(n, v, -100)
    g = torch.randn(n)
    ref_logp, ref_dx, ref_dw, ref_db = reference_grads(x, w, b, y, g, -100)
    logp, lse = K._forward(x, w, y, b, -100, cfg)
    dx, dw, db = K._backward(x, w, y, lse, g, b, -100, (True, True, True), cfg, dw_mode)
    for got, want in ((logp, ref_logp), (dx, ref_dx), (dw, ref_dw), (db, ref_db)):
        assert_close(got, want, **FP32_TOL)


@interpret
def test_autograd_function_end_to_end():
    n, h, v = 47, 31, 123
    x, w, b = make_inputs(n, h, v, bias=True)
    y = make_targets(n, v, -1)
    g = torch.randn(n)
    ref_logp, ref_dx, ref_dw, ref_db = reference_grads(x, w, b, y, g, -1)
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    logp = K.LinearLogprobsFunction.apply(x, w, y, b, -1)
    (logp * g).sum().backward()
    assert_close(logp.detach(), ref_logp, **FP32_TOL)
    for got, want in ((x.grad, ref_dx), (w.grad, ref_dw), (b.grad, ref_db)):
        assert_close(got, want, **FP32_TOL)


@interpret
def test_autograd_expanded_grad_and_partial_requires_grad():
    """logp.sum() hands backward a stride-0 grad; a frozen head (W, b without grad) must come back as None."""
    n, h, v = 20, 24, 70
    x, w, b = make_inputs(n, h, v, bias=True)
    y = make_targets(n, v, -100)
    _, ref_dx, _, _ = reference_grads(x, w, b, y, torch.ones(n), -100)
    x = x.clone().requires_grad_()
    K.LinearLogprobsFunction.apply(x, w, y, b, -100).sum().backward()
    assert_close(x.grad, ref_dx, **FP32_TOL)


def assert_needed_grads(needs, got, ref) -> None:
    """Each needed gradient close to the reference's (fp32 tolerance); each one not needed is None."""
    for need, grad, want in zip(needs, got, ref, strict=True):
        if need:
            assert_close(grad, want, **FP32_TOL)
        else:
            assert grad is None


@interpret
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True), (False, False, True), (False,) * 3])
def test_needs_input_grad(needs):
    n, h, v = 9, 20, 50
    x, w, b = make_inputs(n, h, v, bias=True)
    y = make_targets(n, v, -100)
    g = torch.randn(n)
    _, *ref = reference_grads(x, w, b, y, g, -100)
    _, lse = K.linear_logprobs_forward(x, w, y, b)
    got = K.linear_logprobs_backward(x, w, y, lse, g, b, needs_input_grad=needs)
    assert_needed_grads(needs, got, ref)


@interpret
@pytest.mark.parametrize("dw_mode", ["atomic", "owned"])
def test_large_vocab_and_large_logits(dw_mode):
    """V = 58,498 (Show-o's head) with logits in the hundreds: the online logsumexp must neither overflow nor drift."""
    n, h, v = 6, 16, 58498
    x, w, _ = make_inputs(n, h, v, bias=False)
    x = x * 40  # logits of std ~80, max ~400: exp() overflows fp32 without the running max
    y = torch.randint(0, v, (n,))
    y[0] = v - 1  # the last, partial vocab tile
    g = torch.randn(n)
    ref_logp, ref_dx, ref_dw, _ = reference_grads(x, w, None, y, g, -100)
    cfg = K.LaunchConfig(16, 1024, 16)  # wide vocab tiles keep the interpreter quick; 58 tiles, split 8 ways
    logp, lse = K._forward(x, w, y, None, -100, cfg)
    assert torch.isfinite(logp).all()
    assert_close(logp, ref_logp, atol=1e-3, rtol=1e-5)  # |logp| ~ 100s: fp32 logits carry ~1e-5 relative error
    dx, dw, _ = K._backward(x, w, y, lse, g, None, -100, (True, True, False), cfg, dw_mode)
    assert_close(dx, ref_dx, atol=1e-3, rtol=1e-4)
    assert_close(dw, ref_dw, atol=1e-3, rtol=1e-4)


@interpret
@pytest.mark.parametrize("dw_mode", ["atomic", "owned"])
def test_nan_input_gives_nan_logp_only_in_its_row(dw_mode):
    n, h, v = 20, 24, 70
    x, w, _ = make_inputs(n, h, v, bias=False)
    y = torch.randint(0, v, (n,))
    x[3, 5] = float("nan")  # a kept row
    x[7] = float("nan")  # an ignored row: logp stays 0
    y[7] = -100
    logp, lse = K.linear_logprobs_forward(x, w, y)
    assert torch.isnan(logp[3]) and logp[7] == 0
    clean = torch.ones(n, dtype=torch.bool)
    clean[[3, 7]] = False
    assert_close(logp[clean], reference(x[clean].double(), w.double(), y[clean]), **FP32_TOL)

    # Rows without upstream grad (3: g = 0; 7: ignored) add nothing, NaN or not, whatever shares their row block.
    g = torch.randn(n)
    g[3] = 0.0
    dx, dw, _ = K.linear_logprobs_backward(x, w, y, lse, g, needs_input_grad=(True, True, False), dw_mode=dw_mode)
    _, ref_dx, ref_dw, _ = reference_grads(x[clean], w, None, y[clean], g[clean], -100)
    assert (dx[~clean] == 0).all()
    assert_close(dx[clean], ref_dx, **FP32_TOL)
    assert_close(dw, ref_dw, **FP32_TOL)

    # With a grad, the NaN row poisons its own dx row and (through softmax) every column of dW, as in torch.
    g[3] = 1.0
    dx, dw, _ = K.linear_logprobs_backward(x, w, y, lse, g, needs_input_grad=(True, True, False), dw_mode=dw_mode)
    assert torch.isnan(dx[3]).all() and torch.isfinite(dx[clean]).all() and torch.isnan(dw).any(1).all()


@interpret
@pytest.mark.parametrize("dw_mode", ["auto", "atomic"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16bit_within_twice_torch_error(dtype, dw_mode):
    """The 16-bit paths (dz rounded to the input dtype for the MMA, fp32 sums, one rounding at the end) vs torch in
    the same dtype. "auto" is the owned backward for 16-bit inputs."""
    n, h, v = 40, 48, 200
    x, w, b = make_inputs(n, h, v, bias=True, dtype=dtype)
    y = make_targets(n, v, -100)
    g = torch.randn(n)
    ref = reference_grads(x, w, b, y, g, -100)
    torch_lowp = torch_lowp_grads(x, w, b, y, g, -100)
    logp, lse = K.linear_logprobs_forward(x, w, y, b)
    dx, dw, db = K.linear_logprobs_backward(x, w, y, lse, g, b, dw_mode=dw_mode)
    assert dx.dtype == dw.dtype == db.dtype == dtype
    assert_within_twice_torch_error((logp, dx, dw, db), torch_lowp, ref)


def torch_lowp_grads(x, w, b, y, g, ignore_index):
    """The naive path in the input dtype (logits in x.dtype, fp32 log_softmax): 'torch's own error'."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    keep = y != ignore_index
    logits = F.linear(x, w, b)  # (N, V) in x.dtype
    logp = torch.log_softmax(logits.float(), -1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(keep, logp, torch.zeros_like(logp))
    (logp * g).sum().backward()
    return logp.detach(), x.grad, w.grad, b.grad if b is not None else None


def assert_within_twice_torch_error(fast, torch_lowp, ref):
    """flash-attn's rule: max|fast − ref| ≤ 2·max|torch_lowp − ref| (plus a hair for exact-zero torch error)."""
    for name, f, t, r in zip(("logp", "dx", "dW", "db"), fast, torch_lowp, ref, strict=True):
        if r is None:
            continue
        fast_err = (f.double() - r).abs().max().item()
        torch_err = (t.double() - r).abs().max().item()
        assert fast_err <= 2 * torch_err + 1e-6, f"{name}: fast err {fast_err:.3g} vs torch err {torch_err:.3g}"


@interpret
@pytest.mark.parametrize("dw_mode", ["atomic", "owned"])
def test_empty_batch(dw_mode):
    x, w, b = make_inputs(0, 8, 30, bias=True)
    y = torch.zeros(0, dtype=torch.int64)
    logp, lse = K.linear_logprobs_forward(x, w, y, b)
    dx, dw, db = K.linear_logprobs_backward(x, w, y, lse, torch.zeros(0), b, dw_mode=dw_mode)
    assert logp.shape == lse.shape == (0,) and dx.shape == (0, 8)
    assert (dw == 0).all() and (db == 0).all()


# ---------------------------------------------------------------------------------------------------------------------
# GPU (compiled kernels, bf16)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="needs compiled kernels, not the interpreter")
@pytest.mark.parametrize("shape,bias", [((256, 512, 4096), True), ((300, 2048, 58498), False)], ids=["small", "showo"])
@pytest.mark.parametrize("dw_mode", ["owned", "atomic"])
def test_gpu_bf16_within_twice_torch_error(shape, bias, dw_mode):
    n, h, v = shape
    x, w, b = make_inputs(n, h, v, bias, dtype=torch.bfloat16, device="cuda")
    y = make_targets(n, v, -100).cuda()
    g = torch.randn(n, device="cuda")
    ref = reference_grads(x, w, b, y, g, -100)
    torch_lowp = torch_lowp_grads(x, w, b, y, g, -100)
    xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
    bf = b.clone().requires_grad_() if bias else None
    logp = K.LinearLogprobsFunction.apply(xf, wf, y, bf, -100, dw_mode)
    (logp * g).sum().backward()
    assert xf.grad.dtype == wf.grad.dtype == torch.bfloat16
    fast = (logp.detach(), xf.grad, wf.grad, bf.grad if bias else None)
    assert_within_twice_torch_error(fast, torch_lowp, ref)


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="needs compiled kernels, not the interpreter")
@pytest.mark.parametrize("dw_mode", ["owned", "atomic"])
def test_gpu_fp32_ieee_matches_float64(dw_mode):
    n, h, v = 200, 256, 5000
    x, w, b = make_inputs(n, h, v, bias=True, device="cuda")
    y = make_targets(n, v, -100).cuda()
    g = torch.randn(n, device="cuda")
    ref_logp, ref_dx, ref_dw, ref_db = reference_grads(x, w, b, y, g, -100)
    logp, lse = K.linear_logprobs_forward(x, w, y, b)
    dx, dw, db = K.linear_logprobs_backward(x, w, y, lse, g, b, dw_mode=dw_mode)
    for got, want in ((logp, ref_logp), (dx, ref_dx), (dw, ref_dw), (db, ref_db)):
        assert_close(got, want, **FP32_TOL)


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="needs compiled kernels, not the interpreter")
@pytest.mark.parametrize("n", [4096, 16384], ids=["one_pass", "two_pass"])
def test_gpu_bf16_backward_peak_memory_follows_the_model(n):
    """The H100 shape (H 2048, V 58,498, bf16): the owned backward's peak beyond its inputs and returned gradients is
    backward_extra_bytes (≤ 0.2× inputs + gradients), the atomic one's about 1.0×; owned and atomic agree."""
    h, v = 2048, 58498
    x, w, b = make_inputs(n, h, v, bias=True, dtype=torch.bfloat16, device="cuda")
    y = make_targets(n, v, -100).cuda()
    g = torch.randn(n, device="cuda")
    _, lse = K.linear_logprobs_forward(x, w, y, b)
    io = K.inputs_and_grads_bytes(n, h, v, torch.bfloat16)
    grads = {}
    for mode in ("owned", "atomic"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grads[mode] = K.linear_logprobs_backward(x, w, y, lse, g, b, dw_mode=mode)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base - io // 2  # io // 2: the gradients dx, dW, db
        model = K.backward_extra_bytes(n, h, v, torch.bfloat16, dw_mode=mode)
        assert extra <= model + 2**20, (mode, extra, model)  # + the allocator's 512-byte rounding, at most
        if mode == "owned":
            assert extra <= 0.2 * io, extra / io
    for a, c in zip(grads["owned"], grads["atomic"], strict=True):
        torch.testing.assert_close(a.float(), c.float(), atol=1e-2, rtol=1.6e-2)
