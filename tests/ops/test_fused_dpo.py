"""FusedLinearDPOLoss against the materialized oracle: loss, aux tuple, gradients of every input, chunking, budget.

The drop-in matrix against liger-kernel itself is tests/ops/test_fused_dpo_liger.py.
"""

import warnings

import pytest
import torch

import hermesflow_fast.ops.fused_dpo as fused_dpo
from hermesflow_fast.ops import (
    DPO_LOSS_TYPES,
    FusedLinearDPOFunction,
    FusedLinearDPOLoss,
    fused_linear_dpo_loss,
    reference,
)
from hermesflow_fast.ops.logprobs import MIN_CHUNK_ROWS, default_chunk_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(pairs=3, t=13, h=31, v=123, bias=True, dtype=torch.float32, ignore_index=-100):
    x = torch.randn(2 * pairs, t, h, dtype=dtype, requires_grad=True)
    rx = torch.randn(2 * pairs, t, h, dtype=dtype)
    w = (torch.randn(v, h, dtype=dtype) * 0.3).requires_grad_()
    b = torch.randn(v, dtype=dtype).requires_grad_() if bias else None
    y = torch.randint(0, v, (2 * pairs, t))
    y[:, :4] = ignore_index  # a prompt
    y[1, 9:] = ignore_index  # ragged lengths
    return x, w, b, y, rx


def _params(x, w, b):
    return [p for p in (x, w, b) if p is not None]


def _double(ts):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in ts]


LOSS_CASES = [
    ("sigmoid", 0.0, False), ("sigmoid", 0.2, True), ("hinge", 0.0, False), ("ipo", 0.0, False),
    ("robust", 0.2, False), ("exo_pair", 1e-3, False), ("nca_pair", 0.0, False), ("bco_pair", 0.0, False),
    ("sppo_hard", 0.0, False), ("apo_zero", 0.0, False), ("apo_down", 0.0, False), ("discopop", 0.0, False),
]


def test_loss_cases_cover_every_type():
    assert {c[0] for c in LOSS_CASES} == set(DPO_LOSS_TYPES)


@pytest.mark.parametrize("loss_type,ls,cdpo", LOSS_CASES)
@pytest.mark.parametrize("backend", ["chunked", "twopass"])
def test_loss_types_match_oracle(loss_type, ls, cdpo, backend):
    x, w, b, y, rx = _batch()
    kw = dict(beta=0.1, loss_type=loss_type, label_smoothing=ls, cdpo=cdpo)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cdpo=True says once that it departs from liger
        loss, aux = fused_linear_dpo_loss(x, w, y, b, rx, w, b, backend=backend, **kw)
    xd, wd, bd, rxd = _double([x, w, b, rx])
    ref_loss, ref_aux = reference.fused_linear_dpo(wd, xd, y, bd, rxd, wd, bd, **kw)
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=1e-5)
    for got, want in zip(aux, ref_aux):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-4, rtol=1e-5)
    for got, want in zip(torch.autograd.grad(loss, _params(x, w, b)), torch.autograd.grad(ref_loss, [xd, wd, bd])):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("average,nll", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("chunking", [{}, {"chunk_size": 1}, {"chunk_bytes": 4 * 123 * 5}])
def test_options_and_chunkings_in_float64(bias, average, nll, chunking):
    """float64 inputs run the whole op in float64: agreement to 1e-10 shows the math is the same, not just close."""
    x, w, b, y, rx = _batch(pairs=4, bias=bias, dtype=torch.float64)
    kw = dict(beta=0.2, average_log_prob=average, compute_nll_loss=nll, alpha=0.5)
    loss, aux = fused_linear_dpo_loss(x, w, y, b, rx, w, b, **kw, **chunking)
    ref_loss, ref_aux = reference.fused_linear_dpo(w, x, y, b, rx, w, b, **kw)
    torch.testing.assert_close(loss, ref_loss, atol=1e-10, rtol=1e-10)
    for got, want in zip(aux, ref_aux):
        torch.testing.assert_close(got, want.to(got.dtype), atol=1e-10, rtol=1e-10)
    for got, want in zip(torch.autograd.grad(loss, _params(x, w, b)), torch.autograd.grad(ref_loss, _params(x, w, b))):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_reference_free_and_precomputed_reference():
    x, w, b, y, rx = _batch(dtype=torch.float64)
    free, _ = fused_linear_dpo_loss(x, w, y, b)
    torch.testing.assert_close(free, reference.fused_linear_dpo(w, x, y, b)[0])
    with torch.no_grad():
        ref_lp = reference.sequence_logps(rx, w, y, b, -100, False)
    pre, _ = fused_linear_dpo_loss(x, w, y, b, ref_chosen_logps=ref_lp[:3], ref_rejected_logps=ref_lp[3:])
    full, _ = fused_linear_dpo_loss(x, w, y, b, rx, w, b)
    torch.testing.assert_close(pre, full)


def test_grad_output_scales_and_no_grad_skips_work():
    x, w, b, y, rx = _batch()
    loss, _ = fused_linear_dpo_loss(x, w, y, b, rx, w, b)
    g1 = torch.autograd.grad(loss, [x, w])
    loss, _ = fused_linear_dpo_loss(x, w, y, b, rx, w, b)
    g3 = torch.autograd.grad(3 * loss, [x, w])
    for a, c in zip(g1, g3):
        torch.testing.assert_close(3 * a, c)
    with torch.no_grad():
        nl, _ = fused_linear_dpo_loss(x, w, y, b, rx, w, b)
    assert not nl.requires_grad
    torch.testing.assert_close(nl, loss.detach())


@pytest.mark.parametrize("backend", ["chunked", "twopass"])
@pytest.mark.parametrize("nll", [False, True])
def test_loss_scale_is_a_constant_factor_on_loss_and_gradients(backend, nll):
    """loss_scale=c gives c·loss and c·gradients (the aux tuple unscaled), as c·loss would, in float64 to 1e-12."""
    x, w, b, y, rx = _batch(dtype=torch.float64)
    kw = dict(beta=0.2, compute_nll_loss=nll, alpha=0.7, backend=backend)
    loss, aux = fused_linear_dpo_loss(x, w, y, b, rx, w, b, **kw)
    g = torch.autograd.grad(loss, [x, w, b])
    scaled, aux_s = fused_linear_dpo_loss(x, w, y, b, rx, w, b, loss_scale=0.37, **kw)
    torch.testing.assert_close(scaled, 0.37 * loss, atol=1e-12, rtol=1e-12)
    for a, c in zip(aux, aux_s):
        torch.testing.assert_close(a, c)
    for a, c in zip(g, torch.autograd.grad(scaled, [x, w, b])):
        torch.testing.assert_close(0.37 * a, c, atol=1e-12, rtol=1e-12)
    ref, _ = reference.fused_linear_dpo(w, x, y, b, rx, w, b, beta=0.2, compute_nll_loss=nll, alpha=0.7,
                                        loss_scale=0.37)  # the plain-torch twin takes the same argument
    torch.testing.assert_close(scaled, ref, atol=1e-10, rtol=1e-10)
    for a, c in zip(g, torch.autograd.grad(ref, [x, w, b])):
        torch.testing.assert_close(0.37 * a, c, atol=1e-10, rtol=1e-10)


def test_one_chunk_of_whole_pairs_at_a_time(logits_rows):
    seen = logits_rows
    x, w, b, y, rx = _batch(pairs=6, t=20)
    loss, _ = fused_linear_dpo_loss(x, w, y, b, rx, w, b, chunk_bytes=4 * 123 * 40)
    loss.backward()
    rows_per_pair = [int((y[p] != -100).sum() + (y[6 + p] != -100).sum()) for p in range(6)]
    assert max(seen) <= max(40, max(rows_per_pair))  # never more than the budget, or one pair if a pair is larger
    assert sum(seen) == 2 * int((y != -100).sum())  # policy rows once (grads in forward) + reference rows once


def test_bf16_close_to_fp32():
    x, w, b, y, rx = _batch(pairs=2, t=16, h=64, v=400)
    loss32, _ = fused_linear_dpo_loss(x, w, y, b, rx, w, b)
    xb, wb, bb = (t.detach().bfloat16().requires_grad_() for t in (x, w, b))
    loss16, _ = fused_linear_dpo_loss(xb, wb, y, bb, rx.bfloat16(), wb, bb)
    loss16.backward()
    assert loss16.dtype == torch.float32 and wb.grad.dtype == torch.bfloat16
    assert abs(loss16.item() - loss32.item()) < 5e-2


@pytest.mark.parametrize("backend", ["chunked", "twopass"])
def test_under_autocast_fp32_inputs_run_in_autocast_dtype(backend):
    """A trainer under bf16 autocast holds fp32 hidden states (final LayerNorm) and fp32 master weights: the op runs
    its GEMMs in bf16, as on explicitly cast inputs, and hands back fp32 gradients (it used to fail mixing dtypes)."""
    x, w, b, y, rx = _batch(pairs=2, t=16, h=64, v=400)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, aux = fused_linear_dpo_loss(x, w, y, b, rx, w.detach(), b.detach(), backend=backend)
    loss.backward()
    xb, wb, bb = (t.detach().bfloat16().requires_grad_() for t in (x, w, b))
    want, want_aux = fused_linear_dpo_loss(xb, wb, y, bb, rx.bfloat16(), wb.detach(), bb.detach(), backend=backend)
    want.backward()
    assert loss.dtype == torch.float32 and torch.equal(loss, want) and torch.equal(aux[0], want_aux[0])
    for got, ref in ((x, xb), (w, wb), (b, bb)):
        assert got.grad.dtype == torch.float32
        torch.testing.assert_close(got.grad, ref.grad.float())


def test_module_validates_eagerly_and_inputs():
    with pytest.raises(ValueError, match="sigmoid"):
        FusedLinearDPOLoss(loss_type="nope")
    with pytest.raises(ValueError, match="robust"):
        FusedLinearDPOLoss(loss_type="robust", label_smoothing=0.6)
    with pytest.raises(ValueError, match="chunk_size"):
        FusedLinearDPOLoss(chunk_size=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        FusedLinearDPOLoss(loss_type="sigmoid", label_smoothing=0.7, cdpo=True)  # cDPO needs ε in [0, 0.5]
    x, w, b, y, rx = _batch()
    mod = FusedLinearDPOLoss()
    with pytest.raises(ValueError, match=r"\(2B, T, H\)"):
        mod(w, x[:5], y[:5], b)
    with pytest.raises(ValueError, match="ref_hidden"):
        mod(w, x, y, b, rx[:, :5])
    with pytest.raises(ValueError, match="ref_bias"):
        mod(w, x, y, b, rx, w, torch.randn(7))
    with pytest.raises(ValueError, match="use_ref_model=False"):
        fused_linear_dpo_loss(x, w, y, b, use_ref_model=False, ref_chosen_logps=torch.zeros(3),
                              ref_rejected_logps=torch.zeros(3))


# ---------------------------------------------------------------------------------------------------------------------
# label_smoothing with sigmoid: liger's definition by default, TRL's conservative DPO with cdpo=True, each said once
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_notices(monkeypatch):
    monkeypatch.setattr(fused_dpo, "_said", set())


def test_sigmoid_ignores_label_smoothing_unless_cdpo(fresh_notices):
    x, w, b, y, rx = _batch(dtype=torch.float64)
    plain, _ = fused_linear_dpo_loss(x, w, y, b, rx, w, b, beta=0.1)
    with pytest.warns(UserWarning, match="no effect with loss_type='sigmoid'.*cdpo=True"):
        smoothed, _ = fused_linear_dpo_loss(x, w, y, b, rx, w, b, beta=0.1, label_smoothing=0.2)
    torch.testing.assert_close(smoothed, plain, rtol=0, atol=0)  # liger's definition: ε is not read
    with pytest.warns(UserWarning, match="conservative DPO.*differs from liger"):
        cdpo, _ = fused_linear_dpo_loss(x, w, y, b, rx, w, b, beta=0.1, label_smoothing=0.2, cdpo=True)
    want, _ = reference.fused_linear_dpo(w, x, y, b, rx, w, b, beta=0.1, label_smoothing=0.2, cdpo=True)
    torch.testing.assert_close(cdpo, want, atol=1e-10, rtol=1e-10)
    assert abs(cdpo.item() - plain.item()) > 1e-3  # the two definitions do differ on this batch


def test_notices_are_said_once_per_process_at_construction(fresh_notices):
    with pytest.warns(UserWarning, match="differs from liger") as first:
        FusedLinearDPOLoss(label_smoothing=0.1, cdpo=True)
    assert len(first) == 1 and first[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FusedLinearDPOLoss(label_smoothing=0.3, cdpo=True)  # said already
        FusedLinearDPOLoss(loss_type="robust", label_smoothing=0.1)  # robust reads ε: nothing to say
        FusedLinearDPOLoss(label_smoothing=0.0)  # no ε, nothing to say
    with pytest.warns(UserWarning, match="no effect with loss_type='hinge'"):
        FusedLinearDPOLoss(loss_type="hinge", label_smoothing=0.9)  # accepted (liger accepts it) and said
    x, w, b, y, _ = _batch()
    with pytest.warns(UserWarning, match="no effect with loss_type='apo_zero'") as rec:  # Function: at the caller too
        FusedLinearDPOFunction.apply(x, w, y, b, None, None, None, -100, 0.1, False, True, False, False, None,
                                     "apo_zero", 0.1, 0.05, 1.0)
    assert rec[0].filename == __file__


# ---------------------------------------------------------------------------------------------------------------------
# chunk budget
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v", [32768, 58498, 151936])
@pytest.mark.parametrize("tokens", [2048, 4096, 8192, 16384])
def test_default_chunk_is_about_a_quarter_of_the_rows_from_2048_tokens(v, tokens):
    """The default budget is ceil(rows/4) rows, at least MIN_CHUNK_ROWS; with 256-token sequences (the benchmark's),
    the largest chunk of whole pairs holds at most 0.3 of the tokens' rows, so its logits are under 1/8 of what the
    naive path holds (≥ 2.96 times the (T, V) fp32 logits from 2048 tokens up, bench/results/logprobs.csv)."""
    rows = int(tokens * 0.95)  # 5% of targets ignored, as in the benchmark
    r = default_chunk_rows(rows, v, torch.device("cpu"))
    assert MIN_CHUNK_ROWS <= r <= max(MIN_CHUNK_ROWS, -(-rows // 4))
    g = torch.Generator().manual_seed(0)
    counts = ((torch.rand(tokens // 256, 256, generator=g) >= 0.05).sum(1)).tolist()  # ragged sequences
    chunks = fused_dpo._pair_chunks(counts, len(counts) // 2, r, None)
    n = len(counts) // 2
    biggest = max(sum(counts[p0:p1]) + sum(counts[n + p0 : n + p1]) for p0, p1 in chunks)
    assert biggest <= 0.3 * tokens and 0.3 / 2.96 < 1 / 8


def test_default_budget_makes_several_chunks_and_matches_oracle(logits_rows):
    """A problem of ~1,900 scored rows: the default budget cuts it into chunks of whole pairs (each at most
    max(512, rows / 4) rows) and the result equals the oracle's."""
    x, w, b, y, rx = _batch(pairs=8, t=128, h=8, v=64, dtype=torch.float64)
    loss, aux = fused_linear_dpo_loss(x, w, y, b, rx, w, b, beta=0.1, backend="chunked")
    grads = torch.autograd.grad(loss, [x, w, b])
    scored = int((y != -100).sum())
    assert len(logits_rows) >= 2 * 3  # reference and policy, three chunks or more each
    assert max(logits_rows) <= max(MIN_CHUNK_ROWS, scored // 4 + 1)
    ref_loss, ref_aux = reference.fused_linear_dpo(w, x, y, b, rx, w, b, beta=0.1)
    torch.testing.assert_close(loss, ref_loss, atol=1e-10, rtol=1e-10)
    for got, want in zip(grads, torch.autograd.grad(ref_loss, [x, w, b])):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
