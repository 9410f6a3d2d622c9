"""AdamW groups (what decays) and the warm-up + cosine schedule over the actual step count (docs/differences.md)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from hermesflow_fast.model.config import ModelConfig
from hermesflow_fast.model.transformer import UnifiedTransformer
from hermesflow_fast.train.config import load_config
from hermesflow_fast.train.optim import (
    build_optimizer,
    param_groups,
    resolve_total_steps,
    resolve_warmup,
    warmup_cosine,
)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.scale = nn.Parameter(torch.ones(()))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def _names(groups):
    return {g["weight_decay"]: set(g["param_names"]) for g in groups}


def test_param_groups_rule():
    groups = param_groups(Toy(), 0.01)
    assert _names(groups) == {
        0.01: {"proj.weight", "head.weight"},
        0.0: {"embed.weight", "norm.weight", "norm.bias", "proj.bias", "scale"},
    }
    for g in groups:
        assert len(g["params"]) == len(g["param_names"])


def test_param_groups_on_the_phi_model():
    """Phi's names (input_layernorm, final_layernorm, embed_tokens) defeated Show-o's substring rule."""
    model = UnifiedTransformer(ModelConfig.tiny())
    by_wd = _names(param_groups(model, 0.01))
    no_decay, decay = by_wd[0.0], by_wd[0.01]
    assert "model.embed_tokens.weight" in no_decay and "model.final_layernorm.weight" in no_decay
    assert "model.layers.0.input_layernorm.weight" in no_decay and "lm_head.bias" in no_decay
    assert "lm_head.weight" in decay and "model.layers.0.self_attn.q_proj.weight" in decay
    assert all(p.ndim >= 2 for n, p in model.named_parameters() if n in decay)
    assert no_decay | decay == {n for n, _ in model.named_parameters()}


def test_param_groups_tied_weights_and_errors():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(6, 3)
            self.head = nn.Linear(3, 6, bias=False)
            self.head.weight = self.embed.weight

    groups = param_groups(Tied(), 0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0 and groups[0]["param_names"] == ["embed.weight"]
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(nn.Linear(2, 2).requires_grad_(False), 0.1)
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        param_groups(Toy(), -1.0)


def test_build_optimizer_from_config():
    cfg = load_config(None, ["train.lr=3e-4", "train.adam_betas=[0.8,0.95]", "train.adam_eps=1e-6",
                             "train.weight_decay=0.05"])
    opt = build_optimizer(Toy(), cfg.train)
    assert isinstance(opt, torch.optim.AdamW)
    for g in opt.param_groups:
        assert g["lr"] == 3e-4 and g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6
        assert g["fused"] is True  # plain CPU tensors: torch's fused kernel
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.05]


def test_fused_cpu_step_equals_foreach_adamw():
    """The fused CPU kernel is the same AdamW (decoupled decay, bias correction) as the foreach one."""
    cfg = load_config(None, ["train.lr=1e-2", "train.weight_decay=0.1"])
    torch.manual_seed(0)
    a = Toy()
    b = copy.deepcopy(a)
    opt_a = build_optimizer(a, cfg.train)
    opt_b = torch.optim.AdamW(param_groups(b, 0.1), lr=1e-2, betas=opt_a.defaults["betas"],
                              eps=opt_a.defaults["eps"], foreach=True)
    for _ in range(5):
        ids = torch.randint(0, 10, (6,))
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            (m.head(m.proj(m.norm(m.embed(ids)))) * m.scale).square().mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)


def _lrs(warmup, total, min_ratio=0.0, steps=None, peak=1.0):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak)
    sched = warmup_cosine(opt, warmup, total, min_ratio)
    out = []
    for _ in range((total if steps is None else steps) + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_cosine_values():
    lrs = _lrs(warmup=10, total=110, peak=2e-5)
    assert lrs[0] == 0.0  # linear warm-up from 0
    assert lrs[5] == pytest.approx(1e-5)
    assert lrs[10] == pytest.approx(2e-5)  # peak at the end of warm-up
    assert lrs[60] == pytest.approx(1e-5)  # half-way through the cosine: half the peak
    assert lrs[110] == pytest.approx(0.0, abs=1e-20)  # the minimum at exactly total_steps
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_warmup_cosine_min_ratio_and_no_warmup():
    lrs = _lrs(warmup=0, total=20, min_ratio=0.1, steps=30)
    assert lrs[0] == 1.0
    assert lrs[10] == pytest.approx(0.1 + 0.9 * 0.5)
    assert lrs[20] == pytest.approx(0.1) and lrs[30] == pytest.approx(0.1)  # held at the floor past the end
    assert lrs[19] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 19 / 20)))


def test_warmup_cosine_refuses_a_schedule_that_never_decays():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=r"total_steps=5000 must be > warmup_steps=5000"):
        warmup_cosine(opt, 5000, 5000)
    with pytest.raises(ValueError, match=r"total_steps=3000 must be > warmup_steps=5000"):
        warmup_cosine(opt, 5000, 3000)
    with pytest.raises(ValueError, match="total_steps must be an int >= 1"):
        warmup_cosine(opt, 0, 0)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        warmup_cosine(opt, 0, 10, 1.5)


def test_scheduler_state_resumes_the_schedule():
    full = _lrs(warmup=3, total=12)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, 3, 12)
    for _ in range(5):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = warmup_cosine(opt2, 3, 12)  # build both, then load the optimizer's state, then the scheduler's
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == full[5]
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == full[6]


def test_resolve_warmup_and_total_steps():
    cfg = load_config(None, [])
    assert resolve_warmup(cfg.train, 30) == 3  # ceil(0.1 × 30), not 4 from 3.0000000000000004
    assert resolve_warmup(cfg.train, 5) == 1
    assert resolve_warmup(load_config(None, ["train.warmup_ratio=0"]).train, 5) == 0
    assert resolve_warmup(load_config(None, ["train.warmup_ratio=0.99"]).train, 5) == 4  # stays below the total
    assert resolve_warmup(load_config(None, ["train.warmup_steps=7"]).train, 100) == 7
    with pytest.raises(ValueError, match=r"train.warmup_steps=5000 is not below the run's 3000 optimizer steps"):
        resolve_warmup(load_config(None, ["train.warmup_steps=5000"]).train, 3000)
    assert resolve_total_steps(cfg.train, 10) == 10
    assert resolve_total_steps(load_config(None, ["train.epochs=3"]).train, 7) == 21
    assert resolve_total_steps(load_config(None, ["train.max_steps=50"]).train, 10) == 50
    with pytest.raises(ValueError, match="0 optimizer steps per epoch"):
        resolve_total_steps(cfg.train, 0)
