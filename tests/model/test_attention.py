"""attend(): SDPA / flex / the flash varlen decomposition (through the plain-torch reference varlen) against the
eager dense reference, on Show-o's omni masks built by hand from OmniMask tags; backend resolution (the mask plans
themselves: tests/model/test_mask_plan.py)."""

from __future__ import annotations

import random
import sys
import types

import pytest
import torch

from hermesflow_fast import _notice
from hermesflow_fast._notice import FallbackWarning
from hermesflow_fast.model import attention as A
from hermesflow_fast.model import mask_plan as P
from hermesflow_fast.model.masks import OmniMask

# ----------------------------------------------------------------------------------------------------------------
# masks from tags, one row at a time: a row is a list of (kind, length, branch), kind "pad" | "causal" | block id


def row_tags(parts, T):
    valid, block, branch = [], [], []
    for kind, n, br in parts:
        valid += [kind != "pad"] * n
        block += [kind if isinstance(kind, int) else -1] * n
        branch += [br] * n
    assert len(valid) == T, (len(valid), T)
    return valid, block, branch


def omni(rows, T):
    tags = [row_tags(p, T) for p in rows]
    valid = torch.tensor([t[0] for t in tags], dtype=torch.bool)
    block = torch.tensor([t[1] for t in tags], dtype=torch.int32)
    branch = torch.tensor([t[2] for t in tags], dtype=torch.int32)
    return OmniMask(valid, block, branch)


def t2i_row(text, img, T):
    """Left-padded ``[t2i][bos] text [eos]`` (causal) then ``[soi] image [eoi]`` (one block)."""
    return [("pad", T - text - img, 0), ("causal", text, 0), (0, img, 0)]


def mmu_row(img, text, T):
    """``[mmu][soi] image [eoi]`` one block, then causal text, right padding."""
    return [(0, img, 0), ("causal", text, 0), ("pad", T - img - text, 0)]


def t2i_pair_row(text, img, T):
    """Shared prompt prefix (branch 0), chosen image block (branch 1), rejected image block (branch 2)."""
    return [("pad", T - text - 2 * img, 0), ("causal", text, 0), (0, img, 1), (1, img, 2)]


def mmu_pair_row(img, q, c, r, T):
    """Image block + question prefix (branch 0), chosen caption (branch 1), rejected caption (branch 2), pads."""
    return [(0, img, 0), ("causal", q, 0), ("causal", c, 1), ("causal", r, 2), ("pad", T - img - q - c - r, 0)]


T = 24


def mask_t2i():
    return omni([t2i_row(8, 10, T), t2i_row(5, 10, T), t2i_row(14, 10, T)], T)


def mask_mmu():
    return omni([mmu_row(10, 9, T), mmu_row(10, 14, T), mmu_row(10, 3, T)], T)


def mask_t2i_pair():
    return omni([t2i_pair_row(6, 8, T), t2i_pair_row(2, 8, T), t2i_pair_row(8, 8, T)], T)


def mask_mmu_pair():
    return omni([mmu_pair_row(8, 4, 5, 3, T), mmu_pair_row(8, 2, 7, 7, T), mmu_pair_row(8, 6, 2, 1, T)], T)


def mask_mixed(seed=0):
    rnd = random.Random(seed)
    rows = []
    for _ in range(6):
        kind = rnd.choice(["t2i", "mmu", "t2i_pair", "mmu_pair"])
        if kind == "t2i":
            rows.append(t2i_row(rnd.randint(1, 12), rnd.randint(2, 10), T))
        elif kind == "mmu":
            img = rnd.randint(2, 10)
            rows.append(mmu_row(img, rnd.randint(1, T - img), T))
        elif kind == "t2i_pair":
            rows.append(t2i_pair_row(rnd.randint(1, 8), rnd.randint(2, 7), T))
        else:
            rows.append(mmu_pair_row(rnd.randint(2, 8), rnd.randint(1, 4), rnd.randint(1, 5), rnd.randint(1, 5), T))
    return omni(rows, T)


def mask_odd():
    """Blocks cut by other tokens, a block between causal runs, a pad hole, branch changes mid-block."""
    return omni([
        [(0, 4, 0), ("causal", 3, 0), (0, 5, 0), ("causal", 4, 0), ("pad", 2, 0), ("causal", 6, 0)],
        [("causal", 2, 0), (3, 6, 1), ("pad", 1, 0), (3, 3, 1), ("causal", 4, 2), (5, 8, 2)],
        [(1, 6, 0), (1, 6, 1), ("causal", 6, 2), (2, 6, 0)],
    ], T)


MASKS = {"t2i": mask_t2i, "mmu": mask_mmu, "t2i_pair": mask_t2i_pair, "mmu_pair": mask_mmu_pair, "mixed": mask_mixed,
         "odd": mask_odd}


def qkv(B, Tq, Tk, H=2, D=8, dtype=torch.float32, grad=False):
    q = torch.randn(B, H, Tq, D, dtype=dtype, requires_grad=grad)
    k = torch.randn(B, H, Tk, D, dtype=dtype, requires_grad=grad)
    v = torch.randn(B, H, Tk, D, dtype=dtype, requires_grad=grad)
    return q, k, v


def reference(q, k, v, mask):
    Tq, Tk = q.shape[-2], k.shape[-2]
    return A.eager_attention(q, k, v, mask.dense(q_start=Tk - Tq).unsqueeze(1))


def valid_rows(mask, Tq):
    return mask.valid[:, mask.shape[1] - Tq:][:, None, :, None]  # (B, 1, Tq, 1)


def assert_close_valid(out, ref, mask):
    """Equal on the valid query rows (pad query rows are never read; the split and flash paths give them 0)."""
    keep = valid_rows(mask, out.shape[-2])
    torch.testing.assert_close(out * keep, ref * keep, atol=1e-5, rtol=1e-5)


@pytest.fixture
def fresh_notices(monkeypatch):
    monkeypatch.setattr(_notice, "_said", set())


# ----------------------------------------------------------------------------------------------------------------
# the rule itself (a hand-written dense mask for one t2i row)


def test_tags_give_showo_t2i_mask():
    m = omni([[("pad", 2, 0), ("causal", 3, 0), (0, 3, 0)]], 8)
    d = m.dense()[0].int()
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 1, 1, 1],
    ])
    assert torch.equal(d, expected)


# ----------------------------------------------------------------------------------------------------------------
# SDPA vs eager


@pytest.mark.parametrize("name", sorted(MASKS))
def test_sdpa_matches_eager_values_and_grads(name):
    mask = MASKS[name]()
    B = mask.shape[0]
    q, k, v = qkv(B, T, T, grad=True)
    keep = valid_rows(mask, T)  # the split path gives pad query rows 0 (never read)
    w = torch.randn(B, 2, T, 8) * keep
    grads = []
    for backend in ("sdpa", "eager"):
        out = A.attend(q, k, v, mask, backend=backend)
        g = torch.autograd.grad((out * w).sum(), (q, k, v))
        grads.append((out.detach(), g))
    (o1, g1), (o2, g2) = grads
    torch.testing.assert_close(o1 * keep, o2 * keep, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("packed", [False, True])
def test_sdpa_split_exact_for_random_tags(seed, packed):
    """The split by sequence and branch is exact for any tags (random blocks, branches, pads, packed sequences)."""
    g = torch.Generator().manual_seed(seed)
    B, Tk = 4, 16
    segment = torch.randint(0, 2, (B, Tk), generator=g, dtype=torch.int32).cumsum(1) if packed else None
    mask = OmniMask(torch.rand(B, Tk, generator=g) > 0.2, torch.randint(-1, 3, (B, Tk), generator=g, dtype=torch.int32),
                    torch.randint(0, 3, (B, Tk), generator=g, dtype=torch.int32), segment)
    q, k, v = qkv(B, Tk, Tk, grad=True)
    keep = valid_rows(mask, Tk)
    w = torch.randn(B, 2, Tk, 8) * keep
    out = A.split_attention(q, k, v, P._build_groups(mask, B, Tk, torch.device("cpu")))
    ref = reference(q, k, v, mask)
    torch.testing.assert_close(out * keep, ref * keep, atol=1e-5, rtol=1e-5)
    assert (out * ~keep == 0).all()
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_dense_mask_forms_and_none():
    mask = mask_mmu()
    q, k, v = qkv(3, T, T)
    d3 = mask.dense()
    ref = A.attend(q, k, v, mask, backend="eager")
    for m in (d3, d3.unsqueeze(1)):
        torch.testing.assert_close(A.attend(q, k, v, m, backend="sdpa"), ref, atol=1e-5, rtol=1e-5)
    full = A.attend(q, k, v, None, backend="sdpa")
    torch.testing.assert_close(full, A.eager_attention(q, k, v, None), atol=1e-5, rtol=1e-5)


def test_kv_cached_queries_sdpa():
    mask = mask_mmu_pair()
    q, k, v = qkv(3, 5, T)
    torch.testing.assert_close(A.attend(q, k, v, mask, backend="sdpa"), reference(q, k, v, mask),
                               atol=1e-5, rtol=1e-5)


def test_scale_is_passed():
    mask = mask_t2i()
    q, k, v = qkv(3, T, T)
    keep = valid_rows(mask, T)
    for backend in ("sdpa", "eager"):
        out = A.attend(q, k, v, mask, backend=backend, scale=0.3)
        ref = A.eager_attention(q, k, v, mask.dense().unsqueeze(1), scale=0.3)
        torch.testing.assert_close(out * keep, ref * keep, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# FlexAttention forward on CPU (uncompiled; torch has no CPU backward)


def test_flex_forward_cpu_matches_sdpa():
    q, k, v = qkv(3, T, T)
    for name in ("t2i_pair", "mmu_pair", "odd"):
        mask = MASKS[name]()
        with torch.no_grad():
            out = A.attend(q, k, v, mask, backend="flex")
        assert_close_valid(out, A.attend(q, k, v, mask, backend="sdpa"), mask)
    # KV-cached queries, a dense boolean mask (lookup mask_mod), and no mask
    mask = mask_mmu()
    qs = q[:, :, -6:]
    torch.testing.assert_close(A.attend(qs, k, v, mask, backend="flex"), reference(qs, k, v, mask),
                               atol=1e-5, rtol=1e-5)
    dense = mask.dense()
    torch.testing.assert_close(A.attend(q, k, v, dense, backend="flex"), A.attend(q, k, v, dense, backend="sdpa"),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(A.attend(q, k, v, None, backend="flex"), A.eager_attention(q, k, v, None),
                               atol=1e-5, rtol=1e-5)


def test_flex_on_cpu_with_grad_falls_back_to_sdpa(fresh_notices):
    mask = mask_t2i()
    q, k, v = qkv(3, T, T, grad=True)
    with pytest.warns(FallbackWarning, match="no backward on CPU"):
        out = A.attend(q, k, v, mask, backend="flex")
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    assert_close_valid(out.detach(), reference(q, k, v, mask).detach(), mask)


# ----------------------------------------------------------------------------------------------------------------
# the flash decomposition through the reference varlen


def test_varlen_reference_bottom_right_causal():
    # seqlen_q = 2, seqlen_k = 5: query 0 sees keys 0..3, query 1 sees 0..4 (FA2 >= 2.1); q longer than k: the first
    # rows see nothing and output 0
    q = torch.randn(2 + 4, 1, 4)
    k = torch.randn(5 + 2, 1, 4)
    v = torch.randn(5 + 2, 1, 4)
    cu_q = torch.tensor([0, 2, 6], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 7], dtype=torch.int32)
    out = A._varlen_reference(q, k, v, cu_q, cu_k, 4, 5, causal=True)
    see = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    ref0 = A.eager_attention(q[None, None, :2, 0], k[None, None, :5, 0], v[None, None, :5, 0], see[None, None])
    torch.testing.assert_close(out[:2, 0], ref0[0, 0], atol=1e-6, rtol=1e-6)
    assert torch.equal(out[2:4], torch.zeros(2, 1, 4))  # rows 0, 1 of a 4-query segment over 2 keys
    see2 = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    ref1 = A.eager_attention(q[None, None, 4:, 0], k[None, None, 5:, 0], v[None, None, 5:, 0], see2[None, None])
    torch.testing.assert_close(out[4:, 0], ref1[0, 0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize("Tq", [T, 7, 1])
def test_flash_decomposition_matches_eager(name, Tq):
    mask = MASKS[name]()
    B = mask.shape[0]
    q, k, v = qkv(B, Tq, T, grad=True)
    keep = valid_rows(mask, Tq)
    w = torch.randn(B, 2, Tq, 8) * keep  # pad rows' outputs are never read
    out = A.varlen_attention(q, k, v, mask, varlen_fn=A._varlen_reference)
    ref = reference(q, k, v, mask)
    torch.testing.assert_close(out * keep, ref * keep, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()
    g1 = torch.autograd.grad((out * w).sum(), (q, k, v))
    g2 = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("packed", [False, True])
def test_flash_decomposition_exact_for_random_tags(seed, packed):
    """Any tags decompose exactly (blocks in pieces, mixed branches, pads anywhere, several packed sequences per row),
    not only Show-o's layouts."""
    g = torch.Generator().manual_seed(seed)
    B, Tk = 4, 16
    segment = torch.randint(0, 2, (B, Tk), generator=g, dtype=torch.int32).cumsum(1) if packed else None
    mask = OmniMask(torch.rand(B, Tk, generator=g) > 0.2, torch.randint(-1, 3, (B, Tk), generator=g, dtype=torch.int32),
                    torch.randint(0, 3, (B, Tk), generator=g, dtype=torch.int32), segment)
    for Tq in (Tk, 5):
        q, k, v = qkv(B, Tq, Tk)
        keep = valid_rows(mask, Tq)
        out = A.varlen_attention(q, k, v, mask, varlen_fn=A._varlen_reference)
        torch.testing.assert_close(out * keep, reference(q, k, v, mask) * keep, atol=1e-5, rtol=1e-5)


def test_flash_none_mask_is_full_attention():
    q, k, v = qkv(2, 5, 9)
    out = A.varlen_attention(q, k, v, None, varlen_fn=A._varlen_reference)
    torch.testing.assert_close(out, A.eager_attention(q, k, v, None), atol=1e-5, rtol=1e-5)


def test_attend_flash_path_with_injected_varlen(monkeypatch, fresh_notices):
    """attend(backend='flash') end to end on CPU: pretend CUDA resolution picked flash, run the reference varlen."""
    monkeypatch.setattr(A, "resolve_backend", lambda backend, device, mask=None, dtype=None: "flash")
    monkeypatch.setattr(A, "_load_flash_varlen", lambda: A._varlen_reference)
    mask = mask_mixed(3)
    q, k, v = qkv(6, T, T)
    out = A.attend(q, k, v, mask, backend="flash")
    keep = valid_rows(mask, T)
    torch.testing.assert_close(out * keep, reference(q, k, v, mask) * keep, atol=1e-5, rtol=1e-5)


def test_flash_rejects_dense_mask_and_fp32_real_kernel():
    q, k, v = qkv(3, T, T)
    with pytest.raises(ValueError, match="needs an OmniMask"):
        A.varlen_attention(q, k, v, mask_t2i().dense(), varlen_fn=A._varlen_reference)
    fake = A._wrap_flash(lambda *a, **kw: None, "flash-attn")
    with pytest.raises(ValueError, match="bf16/fp16"):
        A.varlen_attention(q, k, v, mask_t2i(), varlen_fn=fake)


# ----------------------------------------------------------------------------------------------------------------
# errors and backend resolution


@pytest.mark.parametrize("backend", ["sdpa", "eager", "flex", "auto"])
def test_mask_shape_mismatch_errors(backend):
    q, k, v = qkv(3, T, T)
    with pytest.raises(ValueError, match="OmniMask covers"):
        A.attend(q, k, v, omni([t2i_row(4, 4, 10)] * 3, 10), backend=backend)
    with pytest.raises(ValueError, match="expected"):
        A.attend(q, k, v, torch.ones(3, T, T + 1, dtype=torch.bool), backend=backend)
    with pytest.raises(ValueError, match="must be bool"):
        A.attend(q, k, v, torch.ones(3, T, T), backend=backend)


def test_flash_shape_mismatch_and_bad_inputs():
    q, k, v = qkv(3, T, T)
    with pytest.raises(ValueError, match="OmniMask covers"):
        A.varlen_attention(q, k, v, omni([t2i_row(4, 4, 10)] * 3, 10), varlen_fn=A._varlen_reference)
    with pytest.raises(ValueError, match="is not one of"):
        A.attend(q, k, v, None, backend="flash3")
    with pytest.raises(ValueError, match="Tk >= Tq"):
        A.attend(k, q[:, :, :4], v[:, :, :4])
    with pytest.raises(TypeError, match="OmniMask"):
        A.attend(q, k, v, [[True]])


def test_resolve_backend(monkeypatch, fresh_notices):
    om, dense = mask_t2i(), mask_t2i().dense()
    assert A.resolve_backend("auto", "cpu", om) == "sdpa"
    assert A.resolve_backend("eager", "cuda", om) == "eager"
    assert A.resolve_backend("sdpa", "cuda", om) == "sdpa"
    assert A.resolve_backend("flex", "cpu", om) == "flex"  # forward only on CPU; attend falls back for backward
    monkeypatch.setattr(A, "flash_available", lambda: True)
    assert A.resolve_backend("auto", "cuda", om, torch.bfloat16) == "flash"
    assert A.resolve_backend("auto", "cuda", A.prepare(om)) == "flash"
    assert A.resolve_backend("auto", "cuda", om, torch.float32) == "flex"
    assert A.resolve_backend("auto", "cuda", dense) == "flex"
    assert A.resolve_backend("auto", "cuda", None) == "sdpa"
    assert A.resolve_backend("flash", "cuda", om) == "flash"
    with pytest.warns(FallbackWarning, match="needs an OmniMask"):
        assert A.resolve_backend("flash", "cuda", dense) == "flex"
    monkeypatch.setattr(A, "flash_available", lambda: False)
    assert A.resolve_backend("auto", "cuda", om, torch.bfloat16) == "flex"
    with pytest.warns(FallbackWarning, match="pip install flash-attn --no-build-isolation"):
        assert A.resolve_backend("flash", "cuda", om) == "flex"
    with pytest.warns(FallbackWarning, match="needs CUDA"):
        assert A.resolve_backend("flash", "cpu", om) == "sdpa"
    with pytest.raises(ValueError, match="is not one of"):
        A.resolve_backend("fast", "cpu", om)


def test_flash_on_cpu_attend_falls_back_to_sdpa(fresh_notices):
    mask = mask_mmu()
    q, k, v = qkv(3, T, T)
    with pytest.warns(FallbackWarning, match="needs CUDA"):
        out = A.attend(q, k, v, mask, backend="flash")
    assert_close_valid(out, reference(q, k, v, mask), mask)


def test_flash_loader_prefers_fa2_then_fa4(monkeypatch):
    def kernel(*args, **kwargs):
        return "called", args, kwargs

    fa2, fa4 = types.ModuleType("flash_attn"), types.ModuleType("flash_attn.cute")
    fa4.flash_attn_varlen_func = kernel
    monkeypatch.setitem(sys.modules, "flash_attn", fa2)  # flash-attn-4 alone: flash_attn/ without the FA2 API
    monkeypatch.setitem(sys.modules, "flash_attn.cute", fa4)
    monkeypatch.setattr(A, "_FLASH", [])
    fn = A._load_flash_varlen()
    assert fn is not None and fn.kernel_name == "flash-attn-4" and A.flash_available()
    fa2.flash_attn_varlen_func = kernel
    monkeypatch.setattr(A, "_FLASH", [])
    assert A._load_flash_varlen().kernel_name == "flash-attn"
    q = torch.randn(4, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="needs CUDA"):
        fn(q, q, q, None, None, 4, 4)


# ----------------------------------------------------------------------------------------------------------------
# "varlen": torch's own varlen_attn


def _stand_in_varlen_attn(calls):
    """A stand-in for torch.nn.attention.varlen.varlen_attn with its semantics (window (-1, 0) = causal, bottom-right;
    (-1, -1) = full), recording what it was given."""

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        calls.append((cu_q.dtype, cu_k.dtype, type(max_q), window_size, scale))
        assert window_size in ((-1, 0), (-1, -1))
        return A._varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, causal=window_size == (-1, 0),
                                   softmax_scale=scale)

    return kernel


@pytest.mark.parametrize("name", sorted(MASKS))
def test_torch_varlen_translation_matches_eager(name):
    """The OmniMask decomposition through torch's varlen_attn signature (int32 offsets, window_size for causal)
    gives the dense reference: one causal and one bidirectional call."""
    calls = []
    fn = A._wrap_torch_varlen(_stand_in_varlen_attn(calls), check=False)
    mask = MASKS[name]()
    q, k, v = qkv(mask.shape[0], T, T)
    keep = valid_rows(mask, T)
    out = A.varlen_attention(q, k, v, mask, scale=0.3, varlen_fn=fn)
    torch.testing.assert_close(out * keep, A.eager_attention(q, k, v, P.prepare(mask).dense(mask.shape[0], T, T,
                                                                                              q.device), 0.3) * keep,
                               atol=1e-5, rtol=1e-5)
    assert calls and all(c[:3] == (torch.int32, torch.int32, int) and c[4] == 0.3 for c in calls)
    assert {c[3] for c in calls} <= {(-1, 0), (-1, -1)}


def test_torch_varlen_refuses_fp32_and_cpu():
    fn = A._wrap_torch_varlen(_stand_in_varlen_attn([]))
    q = torch.randn(4, 2, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="bf16/fp16"):
        fn(q, q, q, cu, cu, 4, 4)
    with pytest.raises(ValueError, match="CUDA"):
        fn(q.bfloat16(), q.bfloat16(), q.bfloat16(), cu, cu, 4, 4)


def test_auto_picks_torch_varlen_on_cuda_and_says_so_once(monkeypatch, capsys, fresh_notices):
    monkeypatch.setattr(A, "_CHOSEN", set())
    monkeypatch.setattr(A, "torch_varlen_available", lambda: True)
    mask = mask_mixed(3)
    for _ in range(3):  # every layer asks; the choice is printed once
        assert A.resolve_backend("auto", "cuda", mask, torch.bfloat16) == "varlen"
    assert capsys.readouterr().err.count("attention: auto → 'varlen'") == 1
    assert A.resolve_backend("auto", "cuda", None, torch.bfloat16) == "sdpa"  # no mask: SDPA's own flash
    assert A.resolve_backend("auto", "cpu", mask, torch.float32) == "sdpa"
    assert A.resolve_backend("varlen", "cuda", mask, torch.bfloat16) == "varlen"
    monkeypatch.setattr(A, "torch_varlen_available", lambda: False)
    monkeypatch.setattr(A, "flash_available", lambda: False)
    assert A.resolve_backend("auto", "cuda", mask, torch.bfloat16) in ("flex", "sdpa")
    with pytest.warns(FallbackWarning, match="varlen_attn"):
        assert A.resolve_backend("varlen", "cuda", mask, torch.bfloat16) in ("flex", "sdpa")


def test_attend_varlen_path_with_injected_kernel(monkeypatch, fresh_notices):
    """attend(backend='varlen') end to end on CPU: the resolution pretends CUDA, the stand-in runs the calls."""
    monkeypatch.setattr(A, "resolve_backend", lambda backend, device, mask=None, dtype=None: "varlen")
    monkeypatch.setattr(A, "_load_torch_varlen", lambda: A._wrap_torch_varlen(_stand_in_varlen_attn([]), False))
    mask = mask_mixed(3)
    q, k, v = qkv(6, T, T)
    out = A.attend(q, k, v, mask, backend="varlen")
    keep = valid_rows(mask, T)
    torch.testing.assert_close(out * keep, reference(q, k, v, mask) * keep, atol=1e-5, rtol=1e-5)


def test_compiled_blocks_do_not_recompile_across_packed_batches(monkeypatch, fresh_notices):
    """Per-block torch.compile with the varlen path: the plan's offsets change with every batch, yet after the
    warm-up shapes (the first, the one that makes the shapes dynamic, and a one-row batch, which dynamo
    specializes) new batches of other lengths and row counts compile nothing (dynamo only: backend "eager")."""
    from torch._dynamo.utils import counters

    from hermesflow_fast.model import Layout, ModelConfig, UnifiedTransformer, Vocabulary

    monkeypatch.setattr(A, "resolve_backend", lambda backend, device, mask=None, dtype=None: "varlen")
    monkeypatch.setattr(A, "_load_torch_varlen", lambda: A._wrap_torch_varlen(_stand_in_varlen_attn([]), False))
    vocab = Vocabulary.build(text_vocab_size=200, eos=2, num_image_codes=64)
    lay = Layout(vocab, t2i_text_len=24, mmu_text_len=32)
    torch.manual_seed(0)
    model = UnifiedTransformer(ModelConfig.tiny(vocab_size=vocab.vocab_size))
    for i, layer in enumerate(model.model.layers):
        model.model.layers[i] = torch.compile(layer, backend="eager")
    g = torch.Generator().manual_seed(0)

    def step(texts, n):
        rows = len(texts)
        s = lay.t2i_pair(texts, torch.randint(0, 64, (rows, n), generator=g), torch.randint(0, 64, (rows, n),
                         generator=g), torch.rand(rows, n, generator=g) < 0.5)
        model(s.input_ids, s.mask, s.position_ids).sum().backward()

    torch._dynamo.reset()
    counters.clear()
    for texts, n in (([[5, 6, 7], [8]], 16), ([[5] * 9, [8], [9, 10]], 25), ([[7] * 5], 16)):  # warm-up
        step(texts, n)
    warm = counters["stats"]["unique_graphs"]
    for texts, n in (([[5] * 4, [8] * 6], 9), ([[5], [8] * 3, [9] * 12, [3, 4]], 36), ([[4] * 2], 25)):
        step(texts, n)
    assert counters["stats"]["unique_graphs"] == warm
