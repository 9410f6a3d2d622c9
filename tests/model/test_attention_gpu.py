"""attend() on CUDA: compiled FlexAttention and the flash-attention varlen decomposition against the eager fp32
reference in bf16, forward and backward, on Show-o's omni masks (small hand-built ones and a Show-o-sized t2i / mmu
batch with lengths that are not multiples of 128). Skipped without CUDA; the flash cases skip without flash-attn."""

from __future__ import annotations

import pytest
import torch
from test_attention import MASKS, omni

from hermesflow_fast.model import attention as A

pytestmark = pytest.mark.gpu

DEV = torch.device("cuda")
needs_flash = pytest.mark.skipif(not A.flash_available(), reason="flash-attn is not installed")


def showo_masks():
    """B=4 rows of T=387 (256 px t2i: 129 text slots left-padded, [soi] 256 [eoi]) and of mmu (3 + 256 + 128)."""
    T = 387
    t2i = omni([[("pad", 129 - n, 0), ("causal", n, 0), (0, 258, 0)] for n in (20, 60, 129, 7)], T)
    mmu = omni([[(0, 259, 0), ("causal", n, 0), ("pad", 128 - n, 0)] for n in (10, 128, 64, 33)], T)
    pair = omni([[("pad", 129 - n, 0), ("causal", n, 0), (0, 129, 1), (1, 129, 2)] for n in (20, 60, 129, 7)], T)
    return {"showo_t2i": t2i, "showo_mmu": mmu, "showo_t2i_pair": pair}


def cases():
    out = [(name, fn().to(DEV) if torch.cuda.is_available() else None) for name, fn in sorted(MASKS.items())]
    if torch.cuda.is_available():
        out += sorted((name, m.to(DEV)) for name, m in showo_masks().items())
    return out


def run_and_compare(backend, mask, Tq, H=4, D=64):
    B, Tk = mask.shape
    g = torch.Generator(device=DEV).manual_seed(0)
    q = torch.randn(B, H, Tq, D, device=DEV, generator=g).bfloat16().requires_grad_()
    k = torch.randn(B, H, Tk, D, device=DEV, generator=g).bfloat16().requires_grad_()
    v = torch.randn(B, H, Tk, D, device=DEV, generator=g).bfloat16().requires_grad_()
    keep = mask.valid[:, Tk - Tq:][:, None, :, None]  # pad rows' outputs are never read
    w = torch.randn(B, H, Tq, D, device=DEV, generator=g) * keep

    out = A.attend(q, k, v, mask, backend=backend)
    assert out.shape == (B, H, Tq, D) and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    grads = torch.autograd.grad((out.float() * w).sum(), (q, k, v))

    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = A.eager_attention(qf, kf, vf, mask.dense(q_start=Tk - Tq).unsqueeze(1))
    ref_grads = torch.autograd.grad((ref * w).sum(), (qf, kf, vf))

    torch.testing.assert_close(out.float() * keep, ref * keep, atol=2e-2, rtol=2e-2)
    for name, a, b in zip("qkv", grads, ref_grads):
        scale = b.abs().max().clamp(min=1.0)
        err = (a.float() - b).abs().max() / scale
        assert err < 3e-2, f"d{name} off by {err:.3g} (relative to its max)"


@pytest.mark.parametrize("name,mask", cases())
@pytest.mark.parametrize("cached", [False, True])
def test_flex_cuda_bf16_matches_eager(name, mask, cached):
    Tq = 5 if cached else mask.shape[1]
    run_and_compare("flex", mask, Tq)


@needs_flash
@pytest.mark.parametrize("name,mask", cases())
@pytest.mark.parametrize("cached", [False, True])
def test_flash_cuda_bf16_matches_eager(name, mask, cached):
    Tq = 5 if cached else mask.shape[1]
    run_and_compare("flash", mask, Tq)


def test_auto_on_cuda_and_plan_reuse():
    mask = showo_masks()["showo_t2i_pair"].to(DEV)
    expected = "flash" if A.flash_available() else "flex"
    assert A.resolve_backend("auto", DEV, mask, torch.bfloat16) == expected
    run_and_compare("auto", mask, mask.shape[1])
    plan = A.prepare(mask)
    kind = "varlen" if expected == "flash" else "block"
    built = [val for key, val in plan._memo.items() if key[0] == kind]
    assert len(built) == 1  # built once ...
    run_and_compare("auto", mask, mask.shape[1])
    assert [val for key, val in plan._memo.items() if key[0] == kind] == built  # ... and reused by the next call


def test_flex_cuda_dense_mask_and_fp32():
    mask = MASKS["mmu_pair"]().to(DEV)
    B, T = mask.shape
    q, k, v = (torch.randn(B, 4, T, 64, device=DEV) for _ in range(3))
    ref = A.eager_attention(q, k, v, mask.dense().unsqueeze(1))
    torch.testing.assert_close(A.attend(q, k, v, mask.dense(), backend="flex"), ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(A.attend(q, k, v, mask, backend="flex"), ref, atol=2e-3, rtol=2e-3)


@needs_flash
def test_flash_fp32_is_a_clear_error():
    mask = MASKS["t2i"]().to(DEV)
    B, T = mask.shape
    q, k, v = (torch.randn(B, 4, T, 64, device=DEV) for _ in range(3))
    with pytest.raises(ValueError, match="bf16/fp16"):
        A.attend(q, k, v, mask, backend="flash")
