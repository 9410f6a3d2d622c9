"""Mask plans (model/mask_plan.py): the SDPA split groups, the flash varlen segments, the FlexAttention BlockMask read
off the dense mask, and the per-mask-object cache (hit, dropped with the mask, rebuilt after an in-place edit).

    python -m pytest -q tests/model/test_mask_plan.py
"""

from __future__ import annotations

import gc

import pytest
import torch
from test_attention import T, assert_close_valid, mask_mmu_pair, mask_t2i, mask_t2i_pair, omni, qkv, reference

from hermesflow_fast.model import attention as A
from hermesflow_fast.model import mask_plan as P
from hermesflow_fast.model.masks import OmniMask


def test_sdpa_split_groups_and_when_it_is_used():
    """A packed row of two pair layouts: 2 groups per sequence, scoring only within a sequence; one plain causal
    sequence per row (nothing to skip) keeps the single dense call."""
    cpu = torch.device("cpu")
    row = [("causal", 4, 0), (0, 6, 1), (1, 6, 2), ("causal", 3, 0), ("causal", 2, 1), ("causal", 3, 2)]
    m = omni([row], T)
    seg = torch.tensor([[0] * 16 + [1] * 8], dtype=torch.int32)
    mask = OmniMask(m.valid, m.block, m.branch, seg)
    plan = P.prepare(mask).groups(1, T, cpu)
    assert plan is not None
    sizes = [(qi.numel(), ki.numel()) for qi, ki, _ in plan.groups]
    assert sizes == [(10, 10), (6, 10), (5, 5), (3, 6)]
    assert plan.work == 100 + 60 + 25 + 18 and plan.dense_work == T * T
    assert sorted(plan.q_rows.tolist()) == list(range(T))
    q, k, v = qkv(1, T, T)
    torch.testing.assert_close(A.attend(q, k, v, mask, backend="sdpa"), reference(q, k, v, mask), atol=1e-5,
                               rtol=1e-5)
    causal = OmniMask.causal(torch.ones(2, T, dtype=torch.bool))
    assert P.prepare(causal).groups(2, T, cpu) is None  # a lone sequence per row: the dense call


def test_flash_decomposition_segments():
    """Show-o t2i = one non-causal + one causal segment per row; a t2i pair = 2 non-causal + 1 causal; pads none."""
    B, cpu = 3, torch.device("cpu")
    plan = P.prepare(mask_t2i()).varlen(B, T, T, cpu)
    calls = {c[0]: c for c in plan.calls}
    _, _, _, cu_q, cu_k, max_q, max_k = calls[False]  # image blocks (text 8, 5, 14; image 10) see text + image
    assert cu_q.tolist() == [0, 10, 20, 30] and cu_k.tolist() == [0, 18, 33, 57] and (max_q, max_k) == (10, 24)
    _, _, _, cu_q, cu_k, max_q, max_k = calls[True]  # text rows: causal over the text only
    assert cu_q.tolist() == cu_k.tolist() == [0, 8, 13, 27] and max_q == max_k == 14
    pair = mask_t2i_pair()
    plan = P.prepare(pair).varlen(B, T, T, cpu)
    assert {c[0]: c[3].numel() - 1 for c in plan.calls} == {False: 2 * B, True: B}
    assert plan.q_rows.numel() == int(pair.valid.sum()) and plan.num_segments == 3 * B


@pytest.mark.parametrize("Tq", [700, 300, 5])
def test_block_mask_from_dense_equals_create_block_mask(Tq):
    """The BlockMask read off the dense mask has create_block_mask's tiles (full / partial / skipped, edges cut by
    Tq or Tk included) and gives flex the same output, for packed rows over several 128-token tiles."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, T = 2, 700
    g = torch.Generator().manual_seed(0)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, 650:] = False
    block = torch.full((B, T), -1, dtype=torch.long)
    block[:, 100:300] = 1  # a bidirectional image block across a tile edge
    branch = torch.zeros(B, T, dtype=torch.long)
    branch[:, 400:500], branch[:, 500:560] = 1, 2
    segment = torch.sort(torch.randint(0, 3, (B, T), generator=g), dim=1).values
    mask = OmniMask(valid, block, branch, segment)
    off, inner = T - Tq, mask.mask_mod()

    def mod(b, h, q_idx, kv_idx):
        return inner(b, h, q_idx + off, kv_idx)

    ref = create_block_mask(mod, B, None, Tq, T, device="cpu")
    got = P.block_mask_from_dense(mask.dense(q_start=off), mod)

    def tiles(bm, num, idx):
        n, i = getattr(bm, num), getattr(bm, idx)
        return [set(i[b, 0, q, : n[b, 0, q]].tolist()) for b in range(B) for q in range(n.shape[2])]

    for num, idx in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        assert tiles(got, num, idx) == tiles(ref, num, idx)
    q, k, v = qkv(B, Tq, T)
    with torch.no_grad():
        torch.testing.assert_close(flex_attention(q, k, v, block_mask=got), flex_attention(q, k, v, block_mask=ref))


def test_plans_are_cached_per_mask_object_and_dropped_with_it():
    mask = mask_t2i()
    plan = P.prepare(mask)
    assert P.prepare(mask) is plan and P.prepare(plan) is plan and P.prepare(None) is None
    d1 = plan.dense(3, T, T, torch.device("cpu"))
    assert plan.dense(3, T, T, torch.device("cpu")) is d1
    key = id(mask)
    del mask, plan
    gc.collect()
    assert key not in P._PLANS


def test_plan_rebuilds_after_in_place_edit():
    mask = mask_t2i()
    q, k, v = qkv(3, T, T)
    A.attend(q, k, v, mask, backend="sdpa")
    mask.valid[0, -1] = False  # in place: the cached dense mask / split must not be reused
    assert_close_valid(A.attend(q, k, v, mask, backend="sdpa"), reference(q, k, v, mask), mask)
    assert (A.attend(q, k, v, mask, backend="sdpa")[0, :, -1] == 0).all()  # now a pad query row
    vp = P.prepare(mask).varlen(3, T, T, torch.device("cpu"))
    assert vp.q_rows.numel() == int(mask.valid.sum())


def test_plan_passed_as_mask():
    mask = mask_mmu_pair()
    q, k, v = qkv(3, T, T)
    plan = P.prepare(mask)
    assert_close_valid(A.attend(q, k, v, plan, backend="sdpa"), A.attend(q, k, v, mask, backend="eager"), mask)
