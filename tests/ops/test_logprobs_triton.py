"""The public linear_logprobs dispatching to the Triton kernels (run in Triton's interpreter on CPU)."""

import pytest
import torch

from hermesflow_fast.ops import linear_logprobs, reference

pytestmark = pytest.mark.interpret


@pytest.mark.parametrize("lead,h,v", [((2, 9), 16, 70), ((13,), 31, 123)])
def test_public_op_on_the_triton_path(lead, h, v):
    x = torch.randn(*lead, h, requires_grad=True)
    w = torch.randn(v, h, requires_grad=True)
    b = torch.randn(v, requires_grad=True)
    y = torch.randint(0, v, lead)
    y.view(-1)[::3] = -100
    out = linear_logprobs(x, w, y, b, backend="triton")
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = reference.linear_logprobs(xd, wd, y, bd)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    g = torch.randn(lead, dtype=torch.float64)
    got = torch.autograd.grad((out.double() * g).sum(), (x, w, b))
    want = torch.autograd.grad((ref * g).sum(), (xd, wd, bd))
    for a, c in zip(got, want):
        torch.testing.assert_close(a.double(), c, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dw_mode", ["owned", "atomic"])
def test_public_op_dw_modes(dw_mode, dtype):
    """dw_mode reaches the Triton backward through linear_logprobs and LinearLogprobs; both modes give the float64
    gradients (fp32: to 1e-4; bf16: to bf16 rounding of the inputs' products)."""
    from hermesflow_fast.ops import LinearLogprobs

    h, v = 24, 70
    x = torch.randn(2, 9, h).to(dtype).requires_grad_()
    w = torch.randn(v, h).to(dtype).requires_grad_()
    b = torch.randn(v).to(dtype).requires_grad_()
    y = torch.randint(0, v, (2, 9))
    y[0, ::3] = -100
    g = torch.randn(2, 9, dtype=torch.float64)
    g[1, 0] = 0.0
    out = LinearLogprobs(backend="triton", dw_mode=dw_mode)(x, w, y, b)
    got = torch.autograd.grad((out.double() * g).sum(), (x, w, b))
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    want = torch.autograd.grad((reference.linear_logprobs(xd, wd, y, bd) * g).sum(), (xd, wd, bd))
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 2e-2}
    for a, c in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), c, **tol)
