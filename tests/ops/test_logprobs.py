"""linear_logprobs (torch path) against the float64 oracle: values, gradients of every input, chunking, bad input."""

import pytest
import torch

from hermesflow_fast.ops import LinearLogprobs, linear_logprobs, reference

SHAPES = [  # (leading shape, H, V): one realistic-ish, two odd
    ((3, 37), 64, 1000),
    ((47,), 31, 123),
    ((5,), 7, 3),
]


def _inputs(lead, h, v, bias, dtype=torch.float32, ignore_index=-100):
    x = torch.randn(*lead, h, dtype=dtype)
    w = torch.randn(v, h, dtype=dtype) * 0.5
    b = torch.randn(v, dtype=dtype) if bias else None
    y = torch.randint(0, v, lead)
    y.view(-1)[::4] = ignore_index
    return x, w, b, y


def _grads(out, g, tensors):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad((out.double() * g).sum(), tensors)


@pytest.mark.parametrize("lead,h,v", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_bytes", [None, 4 * 8])  # default budget, and a budget of a few rows
@pytest.mark.parametrize("ignore_index", [-100, 1])
def test_matches_float64_reference(lead, h, v, bias, chunk_bytes, ignore_index):
    x, w, b, y = _inputs(lead, h, v, bias, ignore_index=ignore_index)
    cb = None if chunk_bytes is None else chunk_bytes * v
    params = [t.requires_grad_() for t in (x, w, b) if t is not None]
    out = linear_logprobs(x, w, y, b, ignore_index=ignore_index, chunk_bytes=cb)
    assert out.dtype == torch.float32 and out.shape == y.shape
    ref_in = [t.detach().double().requires_grad_() for t in params]
    xr, wr = ref_in[0], ref_in[1]
    br = ref_in[2] if bias else None
    ref = reference.linear_logprobs(xr, wr, y, br, ignore_index)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    assert bool((out[y == ignore_index] == 0).all())
    g = torch.randn(y.shape, dtype=torch.float64)
    for got, want in zip(_grads(out, g, params), _grads(ref, g, ref_in)):
        torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=1e-4)


def test_gradcheck_float64():
    x, w, b, y = _inputs((6,), 5, 11, True, torch.float64)
    for t in (x, w, b):
        t.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: linear_logprobs(x, w, y, b, chunk_bytes=8 * 2 * 11), (x, w, b))


def test_bf16_error_within_twice_torch_bf16():
    """flash-attn's bound: our bf16 error vs the fp64 oracle is at most 2x that of torch's own bf16 path."""
    x, w, b, y = _inputs((64,), 128, 2000, True, torch.bfloat16)
    y[y == -100] = 0
    oracle = reference.linear_logprobs(x.double(), w.double(), y, b.double())
    ours = linear_logprobs(x, w, y, b)
    assert ours.dtype == torch.float32
    torch_bf16 = torch.log_softmax(x @ w.t() + b, -1).gather(1, y[:, None]).squeeze(1)
    err_ours = (ours.double() - oracle).abs().max().item()
    err_torch = (torch_bf16.double() - oracle).abs().max().item()
    assert err_ours <= 2 * err_torch + 1e-6, (err_ours, err_torch)


def test_never_materializes_more_than_one_chunk(logits_rows):
    """The largest logits block ever built has at most chunk_bytes / (4V) rows, forward and backward."""
    seen = logits_rows
    x, w, b, y = _inputs((200,), 16, 500, True)
    x.requires_grad_()
    linear_logprobs(x, w, y, b, chunk_bytes=4 * 500 * 16).sum().backward()
    assert seen and max(seen) <= 16
    assert sum(seen) == 2 * int((y != -100).sum())  # ignored rows never reach a GEMM; backward recomputes once


def test_default_chunks_are_a_quarter_of_the_rows_at_least_512(logits_rows):
    """Without a budget: chunks of ceil(R/4) rows when that is over MIN_CHUNK_ROWS (R = 3,000 scored rows here),
    one chunk of everything when R is small."""
    x, w, b, y = _inputs((4000,), 4, 32, True)  # y: every 4th row ignored, R = 3000
    linear_logprobs(x.requires_grad_(), w, y, b).sum().backward()
    assert max(logits_rows) == 750 and sum(logits_rows) == 2 * 3000
    logits_rows.clear()
    x, w, b, y = _inputs((600,), 4, 32, True)  # R = 450 < 512
    linear_logprobs(x, w, y, b)
    assert logits_rows == [450]


def test_nan_row_stays_local():
    x, w, b, y = _inputs((10,), 8, 50, True)
    y[:] = 3
    x[4, 2] = float("nan")
    out = linear_logprobs(x, w, y, b)
    assert torch.isnan(out[4]) and torch.isfinite(out[torch.arange(10) != 4]).all()


def test_all_ignored_gives_zeros_and_zero_grads():
    x, w, b, y = _inputs((6,), 8, 50, True)
    y[:] = -100
    x.requires_grad_()
    w.requires_grad_()
    out = linear_logprobs(x, w, y, b)
    out.sum().backward()
    assert bool((out == 0).all()) and bool((x.grad == 0).all()) and bool((w.grad == 0).all())


def test_under_autocast_runs_in_autocast_dtype_with_grads_in_input_dtype():
    x, w, b, y = _inputs((3, 9), 16, 100, True)
    for t in (x, w, b):
        t.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_logprobs(x, w, y, b)
    out.sum().backward()
    xb, wb, bb = (t.detach().bfloat16().requires_grad_() for t in (x, w, b))
    want = linear_logprobs(xb, wb, y, bb)
    want.sum().backward()
    assert out.dtype == torch.float32 and torch.equal(out, want)
    for got, ref in ((x, xb), (w, wb), (b, bb)):
        assert got.grad.dtype == torch.float32
        torch.testing.assert_close(got.grad, ref.grad.float())


def test_module_matches_functional():
    x, w, b, y = _inputs((3, 9), 16, 100, True)
    torch.testing.assert_close(LinearLogprobs()(x, w, y, b), linear_logprobs(x, w, y, b))


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda a: a.update(weight=torch.randn(10, 9)), "hidden size"),
        (lambda a: a.update(targets=torch.zeros(4, dtype=torch.long)), "targets must have shape"),
        (lambda a: a.update(bias=torch.randn(11)), "bias must have shape"),
        (lambda a: a.update(weight=a["weight"].double()), "weight is torch.float64"),
        (lambda a: a.update(targets=a["targets"].float()), "integer"),
        (lambda a: a["targets"].__setitem__(0, 10), "targets must lie in [0, 10)"),
        (lambda a: a["targets"].__setitem__(1, -3), "targets must lie in [0, 10)"),
        (lambda a: a.update(hidden=torch.randn(0, 8), targets=torch.zeros(0, dtype=torch.long)), "empty"),
    ],
)
def test_bad_input_names_the_argument(mutate, needle):
    args = {"hidden": torch.randn(5, 8), "weight": torch.randn(10, 8), "targets": torch.randint(0, 10, (5,)),
            "bias": torch.randn(10)}
    mutate(args)
    with pytest.raises(ValueError) as err:
        linear_logprobs(args["hidden"], args["weight"], args["targets"], args["bias"])
    assert needle in str(err.value)


def test_triton_backend_on_cpu_is_a_clear_error():
    x, w, b, y = _inputs((4,), 8, 20, False)
    with pytest.raises(ValueError, match="triton"):
        linear_logprobs(x, w, y, backend="triton")


def test_unknown_dw_mode_is_a_clear_error_on_every_backend():
    from hermesflow_fast.ops import LinearLogprobs

    x, w, b, y = _inputs((4,), 8, 20, False)
    with pytest.raises(ValueError, match="dw_mode"):
        linear_logprobs(x, w, y, dw_mode="fast")
    with pytest.raises(ValueError, match="dw_mode"):
        LinearLogprobs(dw_mode="fast")
    for mode in ("auto", "owned", "atomic"):  # the torch path takes every mode and ignores it
        torch.testing.assert_close(linear_logprobs(x, w, y, dw_mode=mode), linear_logprobs(x, w, y))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [5, 32, 77])
def test_logits_stats_blocked_cpu_path_equals_plain(bias, rows):
    """The CPU path (GEMM without bias, then bias/max/exp/sum 32 rows at a time) = chunk_logits + exp_stats_."""
    from hermesflow_fast.ops.logprobs import chunk_logits, exp_stats_, logits_stats_

    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 16, generator=g, dtype=torch.float64)
    w = torch.randn(300, 16, generator=g, dtype=torch.float64)
    b = torch.randn(300, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, 300, (rows,), generator=g)
    z_ref = chunk_logits(x, w, b)
    want = (z_ref, *exp_stats_(z_ref, y))
    got = logits_stats_(x, w, b, y, torch.empty(rows, 300, dtype=torch.float64))
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, atol=1e-12, rtol=1e-12)
