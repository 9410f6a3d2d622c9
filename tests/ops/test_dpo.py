"""dpo_loss / pair_dpo_loss: every loss type against the independent reference, stability, metrics, bad input."""

import pytest
import torch

from hermesflow_fast.ops import DPO_LOSS_TYPES, dpo_loss, dpo_losses, pair_dpo_loss, reference

TRL_METRICS = {
    "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
}


def _logps(b=9, dtype=torch.float64, scale=20.0):
    return [(torch.randn(b, dtype=dtype) * scale - 50).requires_grad_() for _ in range(4)]


def _smoothing(loss_type):
    return {"exo_pair": 1e-3, "robust": 0.1, "sigmoid": 0.1}.get(loss_type, 0.0)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_matches_reference_values_and_grads(loss_type, beta):
    ls = _smoothing(loss_type)
    t = _logps()
    ours = dpo_losses(*t, beta=beta, loss_type=loss_type, label_smoothing=ls)
    ref = reference.dpo_per_pair_losses(*t, beta=beta, loss_type=loss_type, label_smoothing=ls)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    g1 = torch.autograd.grad(ours.sum(), t[:2])
    g2 = torch.autograd.grad(ref.sum(), t[:2])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_sigmoid_is_stable_where_log_sigmoid_underflows():
    """z = -1000: log(sigmoid(z)) is -inf in fp32; logsigmoid gives 1000 and a gradient of -beta."""
    pc = torch.tensor([-1000.0], requires_grad=True)
    zero = torch.zeros(1)
    loss, _ = dpo_loss(pc, zero, zero, zero, beta=1.0)
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - 1000.0) < 1e-3
    assert abs(pc.grad.item() + 1.0) < 1e-6


def test_metrics_use_trl_names_and_values():
    pc, pr, rc, rr = (torch.tensor(v) for v in ([1.0, -2.0], [0.0, 0.0], [0.5, 0.0], [0.0, 1.0]))
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert TRL_METRICS <= set(m)
    # chosen rewards 0.1*[1-0.5, -2-0] = [0.05, -0.2]; rejected 0.1*[0-0, 0-1] = [0, -0.1]
    torch.testing.assert_close(m["rewards/chosen"], torch.tensor(-0.075))
    torch.testing.assert_close(m["rewards/rejected"], torch.tensor(-0.05))
    torch.testing.assert_close(m["rewards/margins"], torch.tensor(-0.025))
    torch.testing.assert_close(m["rewards/accuracies"], torch.tensor(0.5))
    torch.testing.assert_close(m["logps/chosen"], torch.tensor(-0.5))
    assert not any(v.requires_grad for v in m.values())


def test_bf16_inputs_compute_in_fp32():
    t = [x.detach().bfloat16() for x in _logps(scale=1.0)]
    loss, _ = dpo_loss(*t)
    assert loss.dtype == torch.float32


def test_unknown_loss_type_lists_the_allowed_ones():
    t = _logps(2)
    with pytest.raises(ValueError) as err:
        dpo_loss(*t, loss_type="dpo")
    for name in ("sigmoid", "hinge", "ipo", "robust"):
        assert name in str(err.value)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"loss_type": "robust", "label_smoothing": 0.5}, "[0, 0.5)"),
        ({"loss_type": "exo_pair", "label_smoothing": 0.0}, "exo_pair"),
        ({"beta": 0.0}, "beta"),
        ({"beta": -1.0}, "beta"),
        ({"label_smoothing": 0.7}, "label_smoothing"),
    ],
)
def test_bad_options(kwargs, needle):
    with pytest.raises(ValueError) as err:
        dpo_loss(*_logps(2), **kwargs)
    assert needle in str(err.value)


def test_bad_shapes_name_the_argument():
    a = torch.zeros(3)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_loss(a, a, a, torch.zeros(4))
    with pytest.raises(ValueError, match="policy_chosen_logps must have shape"):
        dpo_loss(torch.zeros(3, 2), a, a, a)
    with pytest.raises(ValueError, match="empty"):
        dpo_loss(*(torch.zeros(0) for _ in range(4)))


# ---------------------------------------------------------------------------------------------------------------------
# Pair-DPO
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_pair_dpo_matches_reference(loss_type):
    und, gen = _logps(), _logps()
    loss, m = pair_dpo_loss(und, gen, beta=0.2, und_coeff=0.7, gen_coeff=1.3, loss_type=loss_type)
    ref = reference.pair_dpo_loss(und, gen, beta=0.2, und_coeff=0.7, gen_coeff=1.3, loss_type=loss_type)
    torch.testing.assert_close(loss, ref)
    g1 = torch.autograd.grad(loss, und[:2] + gen[:2])
    g2 = torch.autograd.grad(ref, und[:2] + gen[:2])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    assert {f"und/{k}" for k in TRL_METRICS} | {f"gen/{k}" for k in TRL_METRICS} <= set(m)
    assert {"und/loss", "gen/loss", "loss"} <= set(m)


def test_pair_dpo_is_per_pair_not_per_batch():
    """Summing the batch's log-probs before the sigmoid (the original code; docs/differences.md) gives a different loss;
    ours is per pair."""
    und, gen = _logps(4, scale=3.0), _logps(4, scale=3.0)
    loss, _ = pair_dpo_loss(und, gen, beta=0.2)
    per_pair = sum(reference.dpo_per_pair_losses(*side, beta=0.2) for side in (und, gen)).mean()
    summed = sum(
        reference.dpo_per_pair_losses(*(t.sum(0, keepdim=True) for t in side), beta=0.2) for side in (und, gen)
    )
    torch.testing.assert_close(loss, per_pair)
    assert not torch.allclose(loss, summed.squeeze())


def test_pair_dpo_one_side_and_errors():
    und = _logps(3)
    loss, m = pair_dpo_loss(und, None, beta=0.2)
    torch.testing.assert_close(loss, reference.dpo_per_pair_losses(*und, beta=0.2).mean())
    assert "gen/loss" not in m
    with pytest.raises(ValueError, match="at least one"):
        pair_dpo_loss(None, None)
    with pytest.raises(ValueError, match="und has 3 pairs but gen has 5"):
        pair_dpo_loss(und, _logps(5))
    with pytest.raises(ValueError, match="gen must be"):
        pair_dpo_loss(und, und[:3])
