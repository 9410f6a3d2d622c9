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
