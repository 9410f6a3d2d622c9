"""The Pair-DPO objective's generation estimator: several masks per pair (packed as branches of one sequence) give
exactly the mean of separate single-mask runs, per-slot means and the RPO term match a plain unpacked computation
(loss and gradients), the weighted path equals the fused op where both apply, precomputed reference log-probs agree
with the reference model, and a step's gradient does not depend on how its pairs are split."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from hermesflow_fast.data.batching import TokenizedPair, micro_batches
from hermesflow_fast.data.gen_mask import pair_mask
from hermesflow_fast.model import IGNORE_INDEX, Layout, ModelConfig, UnifiedTransformer, Vocabulary
from hermesflow_fast.train.objective import PairDPOObjective, label_weights, reference_logps

VOCAB = Vocabulary.build(text_vocab_size=40, eos=3, num_image_codes=16)
LAYOUT = Layout(VOCAB, t2i_text_len=12, mmu_text_len=16)
N, EPOCH, SEED, BETA = 9, 2, 7, 0.5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pairs(n: int, seed: int = 0) -> list[TokenizedPair]:
    """Random pairs, all with a gen side; every other one with an und side too."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(4, 40, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()

    def img():
        return torch.randint(0, 16, (N,), generator=g)

    out = []
    for i in range(n):
        und = i % 2 == 0
        out.append(TokenizedPair(f"p{i:02d}", ids(1, 6), ids(2, 4), img() if und else None,
                                 ids(1, 6) if und else None, ids(1, 6) if und else None, img(), img()))
    return out


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    policy = UnifiedTransformer(ModelConfig.tiny(vocab_size=VOCAB.vocab_size)).double().eval()
    reference = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, reference


def _token_logps(model, seq, name):
    """(L,) log-probs of one unpacked row's target ``name`` (valid labels only), plain log_softmax."""
    h = model(seq.input_ids, seq.mask, seq.position_ids).flatten(0, 1)
    t = seq.targets[name]
    keep = t.labels[0] != IGNORE_INDEX
    logp = torch.log_softmax(model.lm_head(h[t.rows[0][keep]]), -1)
    return logp.gather(-1, t.labels[0][keep].unsqueeze(-1)).squeeze(-1)


def _plain(model, p: TokenizedPair, masks: int, gen_logp: str) -> dict[str, tuple]:
    """Per side: (logπ chosen, logπ rejected, NLL per token of chosen) from separate unpacked single-mask rows."""
    out = {}
    if p.has_und:
        s = LAYOUT.mmu_pair(p.image_codes[None], [p.und_prompt_ids], [p.caption_chosen_ids], [p.caption_rejected_ids])
        c, r = _token_logps(model, s, "chosen"), _token_logps(model, s, "rejected")
        out["und"] = (c.sum(), r.sum(), -c.mean())
    cs, rs, toks = [], [], []
    for m in range(masks):
        masked = pair_mask(p.id, EPOCH, SEED, N, index=m)[None]
        s = LAYOUT.t2i_pair([p.prompt_ids], p.image_chosen_codes[None], p.image_rejected_codes[None], masked)
        c, r = _token_logps(model, s, "chosen"), _token_logps(model, s, "rejected")
        f = torch.sum if gen_logp == "sum" else torch.mean
        cs.append(f(c))
        rs.append(f(r))
        toks.append(c)
    nll = -torch.cat(toks).mean() if gen_logp == "sum" else -torch.stack([t.mean() for t in toks]).mean()
    out["gen"] = (torch.stack(cs).mean(), torch.stack(rs).mean(), nll)
    return out


def _plain_loss(policy, reference, pairs, masks, gen_logp, alpha, coeff=(1.0, 1.0)):
    total = 0.0
    for p in pairs:
        with torch.no_grad():
            ref = _plain(reference, p, masks, gen_logp)
        for side, (pc, pr, nll) in _plain(policy, p, masks, gen_logp).items():
            rc, rr, _ = ref[side]
            ell = -F.logsigmoid(BETA * ((pc - rc) - (pr - rr))) + alpha * nll
            total = total + {"und": coeff[0], "gen": coeff[1]}[side] * ell
    return total / len(pairs)


def _objective_loss(obj, reference, pairs, masks, budget=4096, max_rows=8, precomputed=False):
    total, stats = 0.0, []
    for mb in micro_batches(pairs, LAYOUT, budget, EPOCH, SEED, max_rows=max_rows, gen_masks=masks):
        if precomputed:
            kw = {"ref_logps": reference_logps(reference, mb, obj.gen_logp, obj.loss_type)}
        else:
            with torch.no_grad():
                h = reference(mb.input_ids, mb.mask, mb.position_ids)
            kw = {"ref": (h, reference.lm_head.weight, reference.lm_head.bias)}
        loss, st = obj(mb, scale=1.0 / len(pairs), **kw)
        total = total + loss
        stats.append(st)
    return total, stats


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("gen_logp,alpha", [("sum", 0.0), ("mean", 0.0), ("sum", 1.0), ("mean", 0.7)])
def test_several_masks_equal_the_mean_of_single_mask_calls(models, gen_logp, alpha):
    policy, reference = models
    pairs = _pairs(5)
    obj = PairDPOObjective(policy, beta=BETA, gen_logp=gen_logp, rpo_alpha=alpha)
    want = _plain_loss(policy, reference, pairs, 3, gen_logp, alpha)
    gw = _grads(policy, want)
    got, stats = _objective_loss(obj, reference, pairs, 3)
    gg = _grads(policy, got)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-7)  # the objective returns an fp32 loss
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)
    # the logged loss is what is minimized (per pair, summed), NLL included
    logged = sum(float(s["und/loss"] + s["gen/loss"]) for s in stats) / len(pairs)
    assert logged == pytest.approx(float(want.detach()), rel=1e-7)


def test_one_mask_weighted_path_equals_the_fused_op(models, monkeypatch):
    """At the defaults (one mask, sums, α = 0) the side runs in the fused op; the weighted path gives the same."""
    policy, reference = models
    pairs = _pairs(6, seed=1)
    obj = PairDPOObjective(policy, beta=BETA, label_smoothing=0.1)
    assert all(obj.weights(side, _side(mb, side)) is None for mb in micro_batches(pairs, LAYOUT, 4096, EPOCH, SEED)
               for side in ("und", "gen"))
    fused, s_fused = _objective_loss(obj, reference, pairs, 1)
    g_fused = _grads(policy, fused)
    monkeypatch.setattr(PairDPOObjective, "weights", lambda self, side, sr: label_weights(sr.labels, sr.group))
    weighted, s_weighted = _objective_loss(obj, reference, pairs, 1)
    g_weighted = _grads(policy, weighted)
    assert float(weighted.detach()) == pytest.approx(float(fused.detach()), rel=1e-7)
    for a, b in zip(g_weighted, g_fused):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    for key in ("gen/rewards/margins", "gen/logps/chosen", "gen/nll", "und/loss"):
        assert float(s_weighted[0][key]) == pytest.approx(float(s_fused[0][key]), rel=1e-9), key


def _side(mb, side):
    from hermesflow_fast.train.objective import gather_side

    return gather_side(mb, side)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_precomputed_reference_logps_agree_with_the_reference_model(models, loss_type):
    policy, reference = models
    pairs = _pairs(6, seed=2)
    for masks, gen_logp, alpha in ((1, "sum", 0.0), (3, "mean", 1.0), (2, "sum", 0.5)):
        obj = PairDPOObjective(policy, beta=BETA, loss_type=loss_type, gen_logp=gen_logp, rpo_alpha=alpha)
        with torch.no_grad():
            live, _ = _objective_loss(obj, reference, pairs, masks)
            pre, _ = _objective_loss(obj, reference, pairs, masks, precomputed=True)
        assert float(pre) == pytest.approx(float(live), rel=1e-6), (masks, gen_logp, alpha)


def test_a_steps_gradient_does_not_depend_on_the_split(models):
    """Micro-batches of other sizes (or ranks holding other shares) pack other pairs together: the masks of a pair
    and its weight in the step stay the same, so the summed gradient does too."""
    policy, reference = models
    pairs = _pairs(8, seed=3)
    obj = PairDPOObjective(policy, beta=BETA, gen_logp="mean", rpo_alpha=1.0)
    one, _ = _objective_loss(obj, reference, pairs, 4, budget=4096, max_rows=8)
    g_one = _grads(policy, one)
    total = 0.0
    for share in (pairs[::3], [p for i, p in enumerate(pairs) if i % 3]):  # two "ranks", each in small batches
        part, _ = _objective_loss(obj, reference, share, 4, budget=200, max_rows=1)
        total = total + part * len(share) / len(pairs)
    g_split = _grads(policy, total)
    assert float(total.detach()) == pytest.approx(float(one.detach()), rel=1e-7)
    for a, b in zip(g_split, g_one):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


def test_label_weights():
    labels = torch.tensor([[5, 6, 7, 8, IGNORE_INDEX], [5, 6, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    group = torch.tensor([[0, 0, 0, 1, -1], [0, 1, -1, -1, -1]])
    assert label_weights(labels).tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    assert label_weights(labels, group).tolist() == [[0.5] * 4 + [0], [0.5, 0.5, 0, 0, 0]]
    w = label_weights(labels, group, per_slot=True)
    torch.testing.assert_close(w[0], torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 2, 0], dtype=torch.float64))
    torch.testing.assert_close(label_weights(labels, normalize=True).sum(1), torch.ones(2, dtype=torch.float64))


def test_bad_options():
    with pytest.raises(ValueError, match="gen_logp must be one of"):
        PairDPOObjective(torch.nn.Linear(1, 1), gen_logp="avg")
    with pytest.raises(ValueError, match="rpo_alpha must be ≥ 0"):
        PairDPOObjective(torch.nn.Linear(1, 1), rpo_alpha=-1.0)
