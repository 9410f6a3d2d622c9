"""The torch paths of the fused ops on CUDA in bf16, bounded by 2x torch's own bf16 error (flash-attn's rule)."""

import pytest
import torch

from hermesflow_fast.ops import FusedLinearDPOLoss, linear_logprobs, reference

pytestmark = pytest.mark.gpu


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_logprobs_bf16(backend):
    torch.manual_seed(0)
    n, h, v = 300, 512, 8192
    x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(v, h, device="cuda") * 0.05).bfloat16().requires_grad_()
    b = torch.randn(v, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, v, (n,), device="cuda")
    y[::7] = -100
    g = torch.randn(n, device="cuda")
    out = linear_logprobs(x, w, y, b, backend=backend)
    got = torch.autograd.grad((out * g).sum(), (x, w, b))
    ref_in = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = reference.linear_logprobs(*ref_in[:2], y, ref_in[2])
    want = torch.autograd.grad((ref * g.double()).sum(), ref_in)
    low_in = [t.detach().requires_grad_() for t in (x, w, b)]  # torch's own bf16 path
    logits = low_in[0] @ low_in[1].t() + low_in[2]
    keep = y != -100
    low = torch.log_softmax(logits, -1).gather(1, y.clamp_min(0)[:, None]).squeeze(1) * keep
    low_grads = torch.autograd.grad((low.float() * g).sum(), low_in)
    assert _err(out, ref) <= 2 * _err(low, ref) + 1e-5
    for a, c, lo in zip(got, want, low_grads):
        assert _err(a, c) <= 2 * _err(lo, c) + 1e-5


@pytest.mark.parametrize("backend", ["chunked", "twopass"])
def test_fused_dpo_bf16_close_to_fp64(backend):
    torch.manual_seed(0)
    pairs, t, h, v = 4, 64, 256, 4096
    x = torch.randn(2 * pairs, t, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    rx = torch.randn(2 * pairs, t, h, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(v, h, device="cuda") * 0.05).bfloat16().requires_grad_()
    b = torch.zeros(v, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, v, (2 * pairs, t), device="cuda")
    loss, _ = FusedLinearDPOLoss(backend=backend)(w, x, y, b, rx, w.detach(), b.detach())
    gx, gw = torch.autograd.grad(loss, (x, w))
    xd, wd, bd = (p.detach().double().requires_grad_() for p in (x, w, b))
    ref, _ = reference.fused_linear_dpo(wd, xd, y, bd, rx.double(), wd.detach(), bd.detach())
    rgx, rgw = torch.autograd.grad(ref, (xd, wd))
    assert abs(loss.item() - ref.item()) < 2e-2
    assert _err(gx, rgx) < 5e-2 * rgx.abs().max().item() + 1e-4
    assert _err(gw, rgw) < 5e-2 * rgw.abs().max().item() + 1e-4
