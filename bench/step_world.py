"""The world of one bench/bench_step.py run: the problem's shapes (``Problem``, ``PRESETS``), the seeded models,
MAGVIT-v2, pixels and pairs every process rebuilds alike (``build_world``), and each provider's step (``make_runner``:
the HermesFlow-style step of bench/hermesflow_step.py, or ``Trainer.train_step`` with the naive or the fused head).

    python -m pytest -q tests/bench/test_bench_step_smoke.py
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.hermesflow_step import HermesFlowStep, Pixels, encode_pixels
from hermesflow_fast.data.batching import TokenizedPair
from hermesflow_fast.model import Layout, ModelConfig, UnifiedTransformer, Vocabulary
from hermesflow_fast.model.layout import IGNORE_INDEX
from hermesflow_fast.model.magvit import MAGVITv2, MAGVITv2Config
from hermesflow_fast.ops import reference as ops_reference
from hermesflow_fast.train.config import TrainConfig, load_config
from hermesflow_fast.train.dataset import TrainData
from hermesflow_fast.train.distributed import DistInfo
from hermesflow_fast.train.objective import SIDES, PairDPOObjective, gather_side, side_stats_names
from hermesflow_fast.train.optim import build_optimizer, resolve_warmup, warmup_cosine
from hermesflow_fast.train.trainer import Trainer

SHOW_O_MATMUL_PARAMS = 1.328e9  # phi-1.5 blocks 1.208 B + the 58,498 × 2048 head
QUESTION_LEN = 13  # "USER: Give a detailed caption for this image. ASSISTANT:" in phi-1.5 tokens
PERTURB = 0.01  # policy = reference + PERTURB · N(0, 1) per weight


# ---------------------------------------------------------------------------------------------------------------------
# problem
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    d: int = 384
    layers: int = 6
    heads: int = 6
    pairs: int = 4
    image_size: int = 256
    text_len: int = 128  # mmu text budget; t2i text part = text_len + 1 (Show-o: 128 / 129)
    text_vocab: int = 50295
    code_bits: int = 13  # LFQ bits: 2^13 = 8192 codes
    vq_ch: int = 24
    vq_groups: int = 8
    token_budget: int = 1024
    dtype: str = "fp32"
    device: str = "cpu"
    seed: int = 0
    compile: bool = False  # whether the +compile provider is part of the run (recorded in the config)

    @property
    def grid(self) -> int:
        return self.image_size // 16  # MAGVIT-v2's stride

    @property
    def image_tokens(self) -> int:
        return self.grid**2

    @property
    def row_len(self) -> int:
        """HermesFlow's row length: t2i (text_len + 1) + soi + N + eoi = mmu 3 + N + text_len."""
        return self.text_len + 3 + self.image_tokens

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, hidden_size=self.d, intermediate_size=4 * self.d,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           max_position_embeddings=max(2048, 2 * self.row_len), attn_backend="auto")

    def vq_config(self) -> MAGVITv2Config:
        return MAGVITv2Config(ch=self.vq_ch, norm_groups=self.vq_groups, z_channels=self.code_bits,
                              resolution=self.image_size)

    @property
    def vocab_size(self) -> int:
        """Text vocabulary + 10 special tokens + 2^code_bits image codes + [MASK] (``Vocabulary.build``)."""
        return self.text_vocab + 10 + 2**self.code_bits + 1


def scaled_vq_ch(config: ModelConfig) -> int:
    """MAGVIT-v2 width whose encoder FLOPs keep Show-o's ratio to the backbone's: 128·√(P / P_Show-o), ×8, ≥ 8
    (P: matmul weights, half the forward FLOPs per token)."""
    p = config.forward_flops(1) / 2
    return max(8, 8 * round(128 * math.sqrt(p / SHOW_O_MATMUL_PARAMS) / 8))


PRESETS = {
    "show_o_512": dict(d=2048, layers=24, heads=32, vq_ch=128, vq_groups=32),
}


# ---------------------------------------------------------------------------------------------------------------------
# the world of one run: models, tokenizer, pixels, pairs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class World:
    p: Problem
    vocab: Vocabulary
    layout: Layout
    policy: UnifiedTransformer
    reference: UnifiedTransformer
    vq: MAGVITv2
    pixels: Pixels
    pairs: list[TokenizedPair]


@contextlib.contextmanager
def exact_fp32(device: str):
    """TF32 off for matmuls and convolutions on CUDA (the check compares fp32 paths at 1e-4)."""
    if device != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _texts(g: torch.Generator, n: int, lo: int, hi: int, vocab: int) -> list[list[int]]:
    out = []
    for _ in range(n):
        k = int(torch.randint(lo, hi + 1, (), generator=g))
        out.append(torch.randint(0, min(vocab, 50000), (k,), generator=g).tolist())
    return out


def build_world(p: Problem) -> World:
    """Seeded: every process that builds the world of the same Problem gets the same weights, pixels and pairs."""
    dev = torch.device(p.device)
    eos = 50256 if p.text_vocab > 50256 else p.text_vocab - 1
    vocab = Vocabulary.build(text_vocab_size=p.text_vocab, eos=eos, num_image_codes=2**p.code_bits)
    layout = Layout(vocab, t2i_text_len=p.text_len + 1, mmu_text_len=p.text_len)
    torch.manual_seed(p.seed)
    with dev:  # initialised on the device (a 1.4 B model initialised on the host takes long)
        policy = UnifiedTransformer(p.model_config(vocab.vocab_size))
        vq = MAGVITv2(p.vq_config())
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    torch.manual_seed(p.seed + 1)
    with torch.no_grad():
        for w in policy.parameters():
            w.add_(PERTURB * torch.randn_like(w))
    g = torch.Generator().manual_seed(p.seed)
    B, S = p.pairs, p.image_size
    pixels = Pixels(*(torch.rand(B, 3, S, S, generator=g).mul_(2).sub_(1).to(dev) for _ in range(3)))
    with exact_fp32(p.device):
        real, chosen, rejected = (c.cpu() for c in encode_pixels(vq, pixels))  # the token cache
    q = min(QUESTION_LEN, p.text_len // 4)
    cap_hi = min(90, p.text_len - q - 1)
    prompt_hi = min(60, p.text_len - 2)
    prompts = _texts(g, B, min(20, prompt_hi), prompt_hi, p.text_vocab)
    caps = _texts(g, 2 * B, min(30, cap_hi), cap_hi, p.text_vocab)
    question = _texts(g, 1, q, q, p.text_vocab)[0]
    pairs = [TokenizedPair(id=f"bench-{i:04d}", prompt_ids=prompts[i], und_prompt_ids=question,
                           image_codes=real[i], caption_chosen_ids=caps[2 * i], caption_rejected_ids=caps[2 * i + 1],
                           image_chosen_codes=chosen[i], image_rejected_codes=rejected[i]) for i in range(B)]
    return World(p, vocab, layout, policy, reference, vq, pixels, pairs)


# ---------------------------------------------------------------------------------------------------------------------
# ours: the Trainer's step (and the +packing variant with the naive head)
# ---------------------------------------------------------------------------------------------------------------------


class NaiveHeadObjective(PairDPOObjective):
    """PairDPOObjective with the head done the HermesFlow way (the +packing row): the full logits of every packed
    position for the policy and the reference, a full-vocabulary log_softmax, the target rows gathered from it."""

    def forward(self, batch, ref=None, ref_logps=None, scale: float = 1.0):
        if ref is None:
            raise ValueError("NaiveHeadObjective needs the reference's hidden states (train.precompute_ref_logps off)")
        policy = self.policy
        hidden = policy(batch.input_ids, batch.mask, batch.position_ids)  # (B, T, d)
        logp = torch.log_softmax(policy.lm_head(hidden).float(), dim=-1).flatten(0, 1)  # (B·T, V)
        with torch.no_grad():
            ref_logp = torch.log_softmax(F.linear(ref[0], ref[1], ref[2]).float(), dim=-1).flatten(0, 1)
        total = hidden.new_zeros((), dtype=torch.float32)
        zero = torch.zeros((), dtype=torch.float64, device=hidden.device)
        stats = dict.fromkeys(side_stats_names(), zero)
        for side in SIDES:
            sr = gather_side(batch, side)
            if sr is None:
                continue
            Q = sr.pairs.numel()
            rows, y = sr.rows.to(hidden.device), sr.labels.to(hidden.device)
            keep = y != IGNORE_INDEX
            cols = y.clamp_min(0)

            lp, rlp = ((t[rows, cols] * keep).sum(-1) for t in (logp, ref_logp))  # (2Q,) each
            pc, pr, rc, rr = lp[:Q], lp[Q:], rlp[:Q], rlp[Q:]
            losses = ops_reference.dpo_per_pair_losses(pc, pr, rc, rr, self.beta, self.loss_type,
                                                       self.label_smoothing)
            total = total + (self.coeff[side] * scale) * losses.sum()
            ch, rj = self.beta * (pc - rc).detach(), self.beta * (pr - rr).detach()
            d = lambda t: t.detach().double().sum()  # noqa: E731
            stats.update({f"{side}/count": zero + Q, f"{side}/loss": d(losses), f"{side}/rewards/chosen": d(ch),
                          f"{side}/rewards/rejected": d(rj), f"{side}/rewards/margins": d(ch - rj),
                          f"{side}/rewards/accuracies": d((ch > rj).float()), f"{side}/logps/chosen": d(pc),
                          f"{side}/logps/rejected": d(pr)})
        return total, stats


def train_config(p: Problem, compile_blocks: bool) -> TrainConfig:
    return load_config(None, [
        f"run.seed={p.seed}", f"model.dtype={'bf16' if p.dtype == 'bf16' else 'fp32'}",
        f"model.compile={str(compile_blocks).lower()}", "model.attn_backend=auto",
        f"data.token_budget={p.token_budget}", f"data.t2i_text_len={p.text_len + 1}",
        f"data.max_caption_tokens={p.text_len}",
        f"train.batch_size={p.pairs}", "train.max_steps=1000000", "train.warmup_ratio=0.0",
    ])


def make_trainer(w: World, provider: str, dtype: str | None = None) -> Trainer:
    """A Trainer set up as ``Trainer.setup`` does (same objective, optimizer, scheduler and speed options) on the
    world's in-memory models and pairs, without a run folder; ``train_step(step)`` is then the real step."""
    p = w.p if dtype is None else dataclasses.replace(w.p, dtype=dtype)
    cfg = train_config(p, compile_blocks=provider == "+compile")
    tr = Trainer(cfg, run_dir="/nonexistent-bench-run", info=DistInfo(device=torch.device(p.device)),
                 log=lambda msg: None)
    tr.data = TrainData(w.vocab, w.layout, w.pairs, "bench pairs", p.image_tokens)
    tr.policy, tr.reference = w.policy, w.reference
    tr._configure_speed()
    t = cfg.train
    cls = NaiveHeadObjective if provider == "+packing" else PairDPOObjective
    tr.objective = cls(tr.policy, t.beta, t.loss_type, t.und_coeff, t.gen_coeff, t.label_smoothing)
    tr.model = tr.objective
    tr.optimizer = build_optimizer(tr.policy, t)
    tr.batch_size = min(t.batch_size, len(w.pairs))
    tr.steps_per_epoch = math.ceil(len(w.pairs) / tr.batch_size)
    tr.total_steps = t.max_steps
    tr.scheduler = warmup_cosine(tr.optimizer, resolve_warmup(t, tr.total_steps), tr.total_steps)
    tr.ckpt = types.SimpleNamespace(latest=lambda: None)  # only read when a non-finite step stops the run
    tr.ref_cache = {}
    return tr


def _autocast(p: Problem):
    if p.device == "cuda" and p.dtype == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_hermesflow(w: World, provider: str, dtype: str | None = None) -> HermesFlowStep:
    p = w.p if dtype is None else dataclasses.replace(w.p, dtype=dtype)
    opt = torch.optim.AdamW(w.policy.parameters(), lr=2e-5, weight_decay=0.01)  # HermesFlow: torch AdamW, defaults
    encode = provider == "hermesflow"
    return HermesFlowStep(w.policy, w.reference, w.layout, opt, vq=w.vq if encode else None,
                          pixels=w.pixels if encode else None, beta=0.2, max_grad_norm=1.0, seed=p.seed,
                          autocast=_autocast(p))


def make_runner(w: World, provider: str):
    """(step(k) → loss, owner) for a provider; ``owner`` holds the optimizer (drop it to free the AdamW state)."""
    if provider in ("hermesflow", "+token_cache"):
        hf = make_hermesflow(w, provider)
        return (lambda k: hf.train_step(w.pairs, epoch=k)), hf
    tr = make_trainer(w, provider)
    return (lambda k: tr.train_step(k)["loss"]), tr
