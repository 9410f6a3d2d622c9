"""The drop-in claim, tested broadly: every loss type liger-kernel's fused DPO accepts × with and without a reference
model × bias × NLL × average_log_prob × fp32 and bf16, through each of our forms (module, functional by position,
autograd Function, and the chunk-budget and twopass paths), at a shape that both libraries cut into several chunks.

Expected values come from liger-kernel itself (0.8.5; its chunked torch path runs on CPU with compiled=False) when it
is importable, and always from the plain-torch twin ``reference.fused_linear_dpo``, which implements liger's
definitions, in float64 on the same (rounded) inputs. Label smoothing is set for every loss type, so that the types
that ignore it (sigmoid included) are seen to ignore it as liger does.
"""

import importlib.util
import inspect

import pytest
import torch

from hermesflow_fast.ops import (
    DPO_LOSS_TYPES,
    FusedLinearDPOFunction,
    FusedLinearDPOLoss,
    fused_linear_dpo_loss,
    reference,
)
from hermesflow_fast.ops.fused_dpo import LIGER_LOSS_TYPES

HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
needs_liger = pytest.mark.skipif(not HAS_LIGER, reason="liger-kernel not installed")
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:fused DPO")]

P, T, H, V = 4, 12, 16, 96  # 4 pairs of 12-token sequences: 2 to 4 chunks in every form below
EPS = {"robust": 0.1, "exo_pair": 1e-3}  # liger's ε for the types that read it; 0.2 (ignored) for every other
LIGER_ARGS = ("_input", "weight", "target", "bias", "ref_input", "ref_weight", "ref_bias", "ignore_index", "beta",
              "compute_nll_loss", "compiled", "use_ref_model", "average_log_prob", "chunk_size", "loss_type",
              "label_smoothing", "discopop_tau", "alpha")  # LigerFusedLinearDPOFunction.forward, liger-kernel 0.8.5
LIGER_INIT = ("ignore_index", "beta", "alpha", "compute_nll_loss", "compiled", "use_ref_model", "average_log_prob",
              "chunk_size", "loss_type", "label_smoothing", "discopop_tau")  # LigerFusedLinearDPOLoss.__init__


def _inputs(dtype: torch.dtype, bias: bool, seed: int = 0):
    """Policy leaves (x, w, b) in ``dtype``, targets with a prompt and ragged lengths, reference hidden states."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * P, T, H, generator=g)
    rx = x + 0.3 * torch.randn(2 * P, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.3
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    y = torch.randint(0, V, (2 * P, T), generator=g)
    y[:, :3] = -100  # the prompt
    y[1, 8:] = -100  # ragged lengths, chosen and rejected
    y[P + 2, 5:] = -100
    return tuple(None if t is None else t.to(dtype) for t in (x, w, b)), y, rx.to(dtype)


def _leaves(xwb):
    return [None if t is None else t.detach().clone().requires_grad_() for t in xwb]


def _positional(x, w, y, b, rx, rw, rb, o: dict, chunk_size):
    """liger's 18 positional arguments, in its order."""
    return (x, w, y, b, rx, rw, rb, -100, o["beta"], o["compute_nll_loss"], False, o["use_ref_model"],
            o["average_log_prob"], chunk_size, o["loss_type"], o["label_smoothing"], 0.05, o["alpha"])


def _run(form: str, xwb, y, rx, o: dict):
    """(loss, aux, grads of x, w, b) of one of our forms, on fresh leaves."""
    x, w, b = _leaves(xwb)
    use_ref = o["use_ref_model"]
    rx_, rw, rb = (rx, w.detach(), None if b is None else b.detach()) if use_ref else (None, None, None)
    if form == "module":  # liger's constructor arguments, liger's forward
        loss, aux = FusedLinearDPOLoss(compiled=False, chunk_size=1, **o)(w, x, y, b, rx_, rw, rb)
    elif form == "functional":  # liger's positional signature, 2 pairs per chunk
        loss, aux = fused_linear_dpo_loss(*_positional(x, w, y, b, rx_, rw, rb, o, 2))
    elif form == "function":  # FusedLinearDPOFunction.apply, 1 pair per chunk
        loss, aux = FusedLinearDPOFunction.apply(*_positional(x, w, y, b, rx_, rw, rb, o, 1))
    elif form == "budget":  # chunk_size=None: chunks of whole pairs under a budget of 40 rows of logits
        loss, aux = fused_linear_dpo_loss(*_positional(x, w, y, b, rx_, rw, rb, o, None), chunk_bytes=4 * V * 40)
    elif form == "twopass":  # linear_logprobs in chunks of 8 rows + the loss under autograd
        loss, aux = fused_linear_dpo_loss(*_positional(x, w, y, b, rx_, rw, rb, o, None), backend="twopass",
                                          chunk_bytes=4 * V * 8)
    else:
        raise AssertionError(form)
    params = [t for t in (x, w, b) if t is not None]
    return loss, aux, torch.autograd.grad(loss, params)


def _liger(xwb, y, rx, o: dict):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    x, w, b = _leaves(xwb)
    use_ref = o["use_ref_model"]
    rx_, rw, rb = (rx, w.detach(), None if b is None else b.detach()) if use_ref else (None, None, None)
    loss, aux = LigerFusedLinearDPOLoss(compiled=False, chunk_size=1, **o)(w, x, y, b, rx_, rw, rb)
    return loss, aux, torch.autograd.grad(loss, [t for t in (x, w, b) if t is not None])


def _twin(xwb, y, rx, o: dict):
    x, w, b = (None if t is None else t.detach().double().requires_grad_() for t in xwb)
    use_ref = o["use_ref_model"]
    kw = {k: v for k, v in o.items() if k != "use_ref_model"}
    loss, aux = reference.fused_linear_dpo(w, x, y, b, rx.double() if use_ref else None, w.detach(),
                                           None if b is None else b.detach(), **kw)
    return loss, aux, torch.autograd.grad(loss, [t for t in (x, w, b) if t is not None])


def _assert_close(got, want, tol: float, what: str) -> None:
    """max |got − want| ≤ tol · max |want| (a relative error on the tensor's own scale)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    scale = max(want.double().abs().max().item() if want.numel() else 0.0, 1e-6)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} × {scale:.3g}"


def _compare(got, want, tols: tuple[float, float, float], who: str) -> None:
    loss_tol, aux_tol, grad_tol = tols
    _assert_close(got[0], want[0], loss_tol, f"{who} loss")
    assert len(got[1]) == len(want[1]) == 7
    names = ("chosen_logps", "rejected_logps", "chosen_logits_mean", "rejected_logits_mean", "nll_loss",
             "chosen_rewards", "rejected_rewards")
    for name, g, w in zip(names, got[1], want[1], strict=True):
        _assert_close(g, w, aux_tol, f"{who} {name}")
    for name, g, w in zip(("hidden", "weight", "bias"), got[2], want[2]):
        _assert_close(g, w, grad_tol, f"{who} {name}.grad")


# Relative tolerances (loss, aux, grads). In bf16 both libraries round the logits to bf16 (the GEMM's output), which
# alone moves gradients by up to ~6% of their scale here (discopop, whose gradient is steep in z); so in bf16 we also
# require ours to be no farther from the exact value than liger's is (1.5× its error, or 1% of the scale).
TOLS = {
    torch.float32: {"liger": (1e-5, 1e-4, 1e-4), "twin": (1e-5, 1e-4, 1e-4)},
    torch.bfloat16: {"liger": (3e-3, 6e-2, 8e-2), "twin": (3e-3, 3e-2, 8e-2)},
}


def _no_farther_than_liger(got, liger, twin, who: str) -> None:
    for name, g, lg, w in zip(("hidden", "weight", "bias"), got[2], liger[2], twin[2]):
        scale = w.double().abs().max().item()
        ours = (g.double() - w).abs().max().item()
        theirs = (lg.double() - w).abs().max().item()
        assert ours <= max(1.5 * theirs, 1e-2 * scale), f"{who} {name}.grad: {ours:.3g} from exact, liger {theirs:.3g}"


FORMS = ("module", "functional", "function", "budget", "twopass")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("average", [False, True], ids=["sum", "avg"])
@pytest.mark.parametrize("nll", [False, True], ids=["dpo", "nll"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("use_ref", [True, False], ids=["ref", "noref"])
@pytest.mark.parametrize("loss_type", LIGER_LOSS_TYPES)
def test_every_form_matches_liger_and_twin(loss_type, use_ref, bias, nll, average, dtype):
    xwb, y, rx = _inputs(dtype, bias)
    o = dict(beta=0.1, loss_type=loss_type, label_smoothing=EPS.get(loss_type, 0.2), compute_nll_loss=nll,
             average_log_prob=average, use_ref_model=use_ref, alpha=0.7)
    want_twin = _twin(xwb, y, rx, o)
    want_liger = _liger(xwb, y, rx, o) if HAS_LIGER else None
    for form in FORMS if dtype == torch.float32 else FORMS[:3]:  # bf16 through our own paths: test_fused_dpo.py
        got = _run(form, xwb, y, rx, o)
        assert got[0].dtype == torch.float32 and all(g.dtype == dtype for g in got[2])
        _compare(got, want_twin, TOLS[dtype]["twin"], f"{form} vs twin")
        if want_liger is not None:
            _compare(got, want_liger, TOLS[dtype]["liger"], f"{form} vs liger")
            if dtype == torch.bfloat16:
                _no_farther_than_liger(got, want_liger, want_twin, form)


def test_signatures_are_liger_s():
    """Our Function's and functional's positional parameters are liger's 18 in liger's order (the functional names
    the first seven its own way); the module's constructor starts with liger's 11."""
    fn = list(inspect.signature(FusedLinearDPOFunction.forward).parameters)[1:]  # after ctx
    assert tuple(fn) == LIGER_ARGS
    functional = [p for p in inspect.signature(fused_linear_dpo_loss).parameters.values()
                  if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert len(functional) == 18 and tuple(p.name for p in functional[7:]) == LIGER_ARGS[7:]
    init = list(inspect.signature(FusedLinearDPOLoss.__init__).parameters)[1:]
    assert tuple(init[: len(LIGER_INIT)]) == LIGER_INIT
    if HAS_LIGER:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction

        assert tuple(inspect.signature(LigerFusedLinearDPOFunction.forward).parameters)[1:] == LIGER_ARGS  # after ctx
        assert tuple(inspect.signature(LigerFusedLinearDPOLoss.__init__).parameters)[1:] == LIGER_INIT


def test_every_liger_loss_type_is_supported():
    assert set(LIGER_LOSS_TYPES) <= set(DPO_LOSS_TYPES)
    if HAS_LIGER:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        assert set(LIGER_LOSS_TYPES) == set(LigerFusedLinearDPOLoss._SUPPORTED_LOSS_TYPES)


@needs_liger
def test_function_apply_by_position_and_scaled_backward_match_liger():
    """The same 18-argument tuple to both Functions; a backward from 3·loss scales every gradient, as liger's."""
    from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction

    xwb, y, rx = _inputs(torch.float32, True)
    o = dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, compute_nll_loss=True, average_log_prob=False,
             use_ref_model=True, alpha=1.0)
    grads = []
    for fn in (FusedLinearDPOFunction, LigerFusedLinearDPOFunction):
        x, w, b = _leaves(xwb)
        loss, aux = fn.apply(*_positional(x, w, y, b, rx, w.detach(), b.detach(), o, 1))
        assert not any(a.requires_grad for a in aux)
        grads.append((loss, torch.autograd.grad(3 * loss, [x, w, b])))
    (ours, g_ours), (theirs, g_theirs) = grads
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for a, c in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)


def test_function_under_no_grad_and_autocast():
    """No gradient needed: nothing is saved; under bf16 autocast fp32 leaves get fp32 gradients of the bf16 math."""
    (x, w, b), y, rx = _inputs(torch.float32, True)
    o = dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, compute_nll_loss=False, average_log_prob=False,
             use_ref_model=True, alpha=1.0)
    with torch.no_grad():
        loss, _ = FusedLinearDPOFunction.apply(*_positional(x, w, y, b, rx, w, b, o, None))
    assert not loss.requires_grad
    xl, wl, bl = _leaves((x, w, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = FusedLinearDPOFunction.apply(*_positional(xl, wl, y, bl, rx, wl.detach(), bl.detach(), o, None))
    gx, gw = torch.autograd.grad(loss, [xl, wl])
    assert gx.dtype == gw.dtype == torch.float32
    xb, wb, bb = _leaves((x.bfloat16(), w.bfloat16(), b.bfloat16()))
    want, _ = FusedLinearDPOFunction.apply(*_positional(xb, wb, y, bb, rx.bfloat16(), wb.detach(), bb.detach(), o,
                                                        None))
    assert torch.equal(loss, want)
    torch.testing.assert_close(gw, torch.autograd.grad(want, [wb])[0].float())


def test_reference_free_without_ref_input_and_ref_weight_defaults_to_weight():
    """Where liger fails (use_ref_model=True with no ref_input; ref_input with no ref_weight) ours has a meaning:
    reference-free, and the policy's head scoring the reference's hidden states."""
    (x, w, b), y, rx = _inputs(torch.float64, True)
    free, _ = FusedLinearDPOLoss(use_ref_model=True)(w, x, y, b)
    torch.testing.assert_close(free, FusedLinearDPOLoss(use_ref_model=False)(w, x, y, b, rx, w, b)[0])
    torch.testing.assert_close(free, reference.fused_linear_dpo(w, x, y, b)[0])
    same, _ = FusedLinearDPOLoss()(w, x, y, b, rx)
    torch.testing.assert_close(same, FusedLinearDPOLoss()(w, x, y, b, rx, w, None)[0])
