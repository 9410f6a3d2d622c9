"""Generation-side masks: a pure function of (pair id, epoch, seed), with Show-o's cosine mask-ratio distribution."""

from __future__ import annotations

import math

import pytest
import torch

from hermesflow_fast.data.gen_mask import pair_mask


def test_same_inputs_same_mask_whatever_was_drawn_before():
    a = pair_mask("p1", 3, 10086, 256)
    torch.manual_seed(123)
    torch.rand(1000)  # the global RNG is not used
    for pid in ("p9", "p2", "p1"):  # other pairs drawn in between: no shared state
        pair_mask(pid, 3, 10086, 256)
    b = pair_mask("p1", 3, 10086, 256)
    assert a.dtype == torch.bool and a.shape == (256,) and torch.equal(a, b)


def test_call_order_does_not_matter():
    ids = [f"pair-{i}" for i in range(20)]
    forward = {i: pair_mask(i, 0, 1, 64) for i in ids}
    backward = {i: pair_mask(i, 0, 1, 64) for i in reversed(ids)}
    assert all(torch.equal(forward[i], backward[i]) for i in ids)


def test_epoch_seed_and_id_change_the_mask():
    base = pair_mask("p", 0, 0, 256)
    for other in (pair_mask("p", 1, 0, 256), pair_mask("p", 0, 1, 256), pair_mask("q", 0, 0, 256)):
        assert not torch.equal(base, other)
    masks = torch.stack([pair_mask("p", e, 0, 256) for e in range(50)])
    assert len({tuple(m.nonzero().flatten().tolist()) for m in masks}) == 50


def test_k_follows_the_cosine_schedule():
    N, n = 64, 4000
    k = torch.tensor([int(pair_mask(f"id{i}", 0, 7, N).sum()) for i in range(n)], dtype=torch.float64)
    assert int(k.min()) >= 1 and int(k.max()) <= N
    # r = cos(πt/2), t ~ U(0,1): E[r] = 2/π, P(r ≤ 1/2) = P(t ≥ 2/3) = 1/3
    assert abs(float(k.mean()) / N - 2 / math.pi) < 0.02
    assert abs(float((k <= N / 2).double().mean()) - 1 / 3) < 0.03
    # positions are uniform: each slot masked about E[k]/N of the time
    counts = torch.stack([pair_mask(f"id{i}", 0, 7, N) for i in range(n)]).double().mean(0)
    assert float((counts - 2 / math.pi).abs().max()) < 0.05


def test_one_token_and_bad_n():
    assert pair_mask("p", 0, 0, 1).tolist() == [True]
    with pytest.raises(ValueError, match="num_tokens must be ≥ 1, got 0 \\(pair 'p'\\)"):
        pair_mask("p", 0, 0, 0)


def test_mask_index_zero_is_the_one_draw_and_each_mask_depends_on_its_index_only():
    from hermesflow_fast.data.gen_mask import pair_masks

    four = pair_masks("p", 3, 5, 64, count=4)
    assert four.shape == (4, 64) and torch.equal(four[0], pair_mask("p", 3, 5, 64))
    assert torch.equal(pair_masks("p", 3, 5, 64, count=2), four[:2])  # more masks leave the first ones as they are
    assert all(torch.equal(four[m], pair_mask("p", 3, 5, 64, index=m)) for m in range(4))
    assert len({tuple(m.nonzero().flatten().tolist()) for m in four}) == 4
    with pytest.raises(ValueError, match="count must be ≥ 1"):
        pair_masks("p", 0, 0, 8, count=0)


def test_ratio_bounds_restrict_the_cosine_law():
    N, n = 64, 2000
    assert all(torch.equal(pair_mask(f"i{i}", 0, 1, N, ratio=(0.0, 1.0)), pair_mask(f"i{i}", 0, 1, N))
               for i in range(20))
    k = torch.tensor([int(pair_mask(f"id{i}", 0, 7, N, ratio=(0.25, 0.75)).sum()) for i in range(n)]).double()
    assert int(k.min()) >= 16 and int(k.max()) <= 48
    # r = cos(πt/2) given 0.25 ≤ r ≤ 0.75: t uniform on [2/π acos 0.75, 2/π acos 0.25]; E[r] = (sin b − sin a)/(b − a)
    a, b = math.acos(0.75), math.acos(0.25)
    assert abs(float(k.mean()) / N - (math.sin(b) - math.sin(a)) / (b - a)) < 0.02
    fixed = {int(pair_mask(f"id{i}", 0, 7, N, ratio=(0.5, 0.5)).sum()) for i in range(50)}
    assert fixed == {32}
    for bad in ((0.6, 0.4), (0.0, 0.0), (-0.1, 1.0), (0.2,)):
        with pytest.raises(ValueError, match="mask ratio bounds"):
            pair_mask("p", 0, 0, 8, ratio=bad)
