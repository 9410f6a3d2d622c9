"""HermesFlow's Pair-DPO training step as the original code computes it: the baseline of ``bench/bench_step.py``.

Written from a description of the original's training step (no code of HermesFlow, Show-o or TRL was copied).
 Per step, for a batch of B homologous pairs whose pixels are inputs (the generated win / lose images and the
real image, (B, 3, H, W) in [−1, 1] each, already on the device, as a dataloader hands them over):

    1. encode      the VQ tokenizer (MAGVIT-v2) encodes the win, the lose and the real images: three encoder calls of
                   B images, every step, under the step's autocast (bf16 on CUDA; the original runs it in fp32)
                   (without ``vq``/``pixels`` it takes the pairs' cached codes instead: the +token_cache row)
    2. sequences   UNPACKED rows, built for win and for lose separately with ``Layout.t2i`` / ``Layout.mmu``:
                     t2i  [pad…][t2i][bos] prompt [eos] [soi] masked image [eoi]        text part left-padded to 129
                     mmu  [mmu][soi] real image [eoi] question caption [eos] [pad…]     text part right-padded to 128
                   the generation mask of a pair is ``pair_mask(pair.id, epoch, seed, N)`` (the same draw as ours)
                   on both images; win batch = cat([t2i_w rows; mmu_w rows]) (2B, T), the same for lose (T = 387 at
                   256 px: t2i and mmu rows have one length, which is what makes HermesFlow's concatenation work);
                   masks: the rows' omni-attention masks as DENSE FLOAT additive masks (2B, 1, T, T), 0 / −inf
    3. forwards    FOUR separate forwards: policy(win), policy(lose), ref(win), ref(lose) (reference under no_grad),
                   each a HF-Phi-style forward of the same ``UnifiedTransformer`` weights (``phi_forward``): SDPA with
                   the float mask, the LM head on every position → full logits (2B, T, V)
    4. log-probs   ``log_softmax`` over the full vocabulary (fp32) of all (2B, T, V) logits, then gather:
                     S_t2i  t2i rows, positions ≥ 129, no shift (mask-token prediction at its own slot), masked slots
                     S_mmu  mmu rows only, next-token shift (logits[:, :-1] vs labels[:, 1:]), caption + eos
                   summed per pair (the original's whole-batch sum off)
    5. loss        ``ops.reference.pair_dpo_loss`` (β = 0.2, sigmoid, coefficients 1 / 1), backward, gradient clipping
                   (max norm 1.0), AdamW step, zero_grad

Bugs and quirks of the original switched off (docs/differences.md), so that this step and ours compute the same loss
on the same batch: the mmu sum over all rows, whole-batch sums, the grey understanding image (the real image is
encoded and used), independent text dropout (no dropout), and the two soi/eoi identity terms of S_t2i (scored by the
original; leaving them out changes two gathers, not the cost). Kept as the original (its gradient checkpointing is
never enabled, so none here either): every image re-encoded each step, unpacked padded rows, four
forwards, a dense float mask, full (2B, T, V) logits and a full-vocabulary log_softmax kept for backward.

    from bench.hermesflow_step import HermesFlowStep
    hf = HermesFlowStep(policy, reference, layout, optimizer, vq=magvit, pixels=pixels)
    loss = hf.train_step(pairs, epoch)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hermesflow_fast.data.batching import TokenizedPair
from hermesflow_fast.data.gen_mask import pair_mask
from hermesflow_fast.model.layout import IGNORE_INDEX, Layout
from hermesflow_fast.model.magvit import MAGVITv2
from hermesflow_fast.model.transformer import UnifiedTransformer
from hermesflow_fast.ops import reference

__all__ = ["HFBatch", "HermesFlowStep", "Pixels", "encode_pixels", "phi_forward"]


@dataclass
class Pixels:
    """The images of the step's pairs, in the pairs' order: (B, 3, H, W) each, in [−1, 1]."""

    real: Tensor  # the understanding side's image
    chosen: Tensor  # the generated win images
    rejected: Tensor  # the generated lose images


@dataclass
class HFBatch:
    """One side (win or lose) of a step: B t2i rows over B mmu rows."""

    input_ids: Tensor  # (2B, T)
    mask: Tensor  # (2B, 1, T, T) float additive: 0 allowed, −inf blocked
    t2i_labels: Tensor  # (B, T) the true code id at masked slots, IGNORE_INDEX elsewhere (no shift)
    mmu_labels: Tensor  # (B, T) caption + eos ids at their own positions, IGNORE_INDEX elsewhere (shift applied later)


@torch.no_grad()
def encode_pixels(vq: MAGVITv2, pixels: Pixels) -> tuple[Tensor, Tensor, Tensor]:
    """(real, chosen, rejected) codes (B, N): three encoder calls, as the original encodes each image batch."""
    return vq.encode(pixels.real), vq.encode(pixels.chosen), vq.encode(pixels.rejected)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _partial_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


def phi_forward(model: UnifiedTransformer, input_ids: Tensor, mask: Tensor) -> Tensor:
    """Full logits (B, T, V) of a HF-Phi-style forward over ``model``'s weights with an additive float mask.

    Phi as transformers runs it with ``attn_implementation='sdpa'`` and a 4-D mask (Show-o's modified Phi): positions
    0..T−1, partial rotary, per layer h = LN(x), x ← x + dense(SDPA(q, k, v, attn_mask=mask)) + fc2(gelu(fc1(h))),
    final LayerNorm, then the untied LM head on every position."""
    cfg = model.config
    B, T = input_ids.shape
    H, D = cfg.num_attention_heads, cfg.head_dim
    x = model.model.embed_tokens(input_ids)  # (B, T, d)
    pos = torch.arange(T, device=input_ids.device, dtype=torch.float32)
    freqs = pos[:, None] * model.inv_freq[None, :]  # (T, r/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, r)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]  # (1, 1, T, r) fp32, cast to q's dtype as HF does
    for layer in model.model.layers:
        h = layer.input_layernorm(x)
        a = layer.self_attn
        q = a.q_proj(h).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = a.k_proj(h).view(B, T, H, D).transpose(1, 2)
        v = a.v_proj(h).view(B, T, H, D).transpose(1, 2)
        if a.q_layernorm is not None:
            q, k = a.q_layernorm(q), a.k_layernorm(k)
        if cos.shape[-1]:
            c, s = cos.to(q.dtype), sin.to(q.dtype)
            q, k = _partial_rope(q, c, s), _partial_rope(k, c, s)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))  # (B, H, T, D)
        x = x + a.dense(o.transpose(1, 2).reshape(B, T, -1)) + layer.mlp(h)
    return model.lm_head(model.model.final_layernorm(x))  # (B, T, V)


def _gather_sum(logp: Tensor, labels: Tensor) -> Tensor:
    """(R, P, V) log-probs, (R, P) labels → (R,) sum of the labelled positions' log-probs."""
    keep = labels != IGNORE_INDEX
    tok = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (R, P)
    return (tok * keep).sum(-1)


class HermesFlowStep:
    """The baseline step; see the module docstring. ``vq`` + ``pixels``: encode every step (None: cached codes)."""

    def __init__(self, policy: UnifiedTransformer, ref_model: UnifiedTransformer, layout: Layout,
                 optimizer: torch.optim.Optimizer, *, vq: MAGVITv2 | None = None, pixels: Pixels | None = None,
                 beta: float = 0.2, max_grad_norm: float | None = 1.0, seed: int = 0,
                 autocast: contextlib.AbstractContextManager | None = None):
        if (vq is None) != (pixels is None):
            raise ValueError("HermesFlowStep: give both vq and pixels (encode every step) or neither (cached codes)")
        self.policy, self.ref_model, self.layout, self.optimizer = policy, ref_model, layout, optimizer
        self.vq, self.pixels = vq, pixels
        self.beta, self.max_grad_norm, self.seed = beta, max_grad_norm, seed
        self.autocast = autocast or contextlib.nullcontext()
        self.device = policy.lm_head.weight.device

    # ------------------------------------------------------------------------------------------------ inputs ----
    def codes(self, pairs: list[TokenizedPair]) -> tuple[Tensor, Tensor, Tensor]:
        """(real, chosen, rejected) codes (B, N) on the CPU: encoded now, or the pairs' cached ones."""
        if self.vq is not None:
            with torch.profiler.record_function("hf.encode"):
                return tuple(c.cpu() for c in encode_pixels(self.vq, self.pixels))  # type: ignore[return-value]
        return (torch.stack([p.image_codes for p in pairs]), torch.stack([p.image_chosen_codes for p in pairs]),
                torch.stack([p.image_rejected_codes for p in pairs]))

    def batches(self, pairs: list[TokenizedPair], epoch: int) -> tuple[HFBatch, HFBatch]:
        """(win, lose) batches of unpacked rows, on the device."""
        real, chosen, rejected = self.codes(pairs)
        with torch.profiler.record_function("hf.sequences"):
            N = chosen.shape[1]
            masked = torch.stack([pair_mask(p.id, epoch, self.seed, N) for p in pairs])  # (B, N), shared w/l
            prompts = [p.prompt_ids for p in pairs]
            questions = [p.und_prompt_ids for p in pairs]
            out = []
            for codes, captions in ((chosen, [p.caption_chosen_ids for p in pairs]),
                                    (rejected, [p.caption_rejected_ids for p in pairs])):
                t2i = self.layout.t2i(prompts, codes, masked)
                mmu = self.layout.mmu(real, questions, captions)
                if t2i.input_ids.shape[1] != mmu.input_ids.shape[1]:
                    raise ValueError(f"t2i rows have {t2i.input_ids.shape[1]} tokens and mmu rows "
                                     f"{mmu.input_ids.shape[1]}: HermesFlow concatenates them, so t2i_text_len "
                                     f"must be mmu_text_len + 1 (129 / 128)")
                out.append(HFBatch(
                    input_ids=torch.cat([t2i.input_ids, mmu.input_ids]).to(self.device),
                    mask=self._float_mask(t2i, mmu),
                    t2i_labels=self._labels(t2i.targets["image"], t2i.input_ids.shape, shift=0),
                    mmu_labels=self._labels(mmu.targets["answer"], mmu.input_ids.shape, shift=1),
                ))
        return out[0], out[1]

    def _float_mask(self, t2i, mmu) -> Tensor:
        """(2B, 1, T, T): the omni-attention masks as an additive float mask, built on the device each step."""
        allowed = torch.cat([t2i.mask.to(self.device).dense(), mmu.mask.to(self.device).dense()])  # (2B, T, T)
        dtype = torch.get_autocast_dtype(self.device.type) if torch.is_autocast_enabled(self.device.type) \
            else self.policy.lm_head.weight.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device)
        return mask.masked_fill_(~allowed, float("-inf")).unsqueeze(1)

    def _labels(self, target, shape, shift: int) -> Tensor:
        """HF-style labels (B, T): a target's (rows, labels) written at rows + shift (next-token rows: +1)."""
        lab = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        keep = target.labels != IGNORE_INDEX
        b = torch.arange(shape[0])[:, None].expand_as(target.rows)
        lab[b[keep], target.rows[keep] + shift] = target.labels[keep]
        return lab.to(self.device)

    # ----------------------------------------------------------------------------------------------- forward ----
    def sequence_logps(self, model: UnifiedTransformer, batch: HFBatch) -> tuple[Tensor, Tensor]:
        """(S_t2i (B,), S_mmu (B,)) of one forward: full logits, full-vocab log_softmax, gather, per-pair sums."""
        B = batch.t2i_labels.shape[0]
        t0 = self.layout.t2i_text_len
        logits = phi_forward(model, batch.input_ids, batch.mask)  # (2B, T, V)
        with torch.profiler.record_function("hf.log_softmax"):
            logp = torch.log_softmax(logits.float(), dim=-1)  # (2B, T, V), fp32
            s_t2i = _gather_sum(logp[:B, t0:], batch.t2i_labels[:, t0:])  # no shift
            s_mmu = _gather_sum(logp[B:, :-1], batch.mmu_labels[:, 1:])  # next-token shift, mmu rows only
        return s_t2i, s_mmu

    def loss(self, pairs: list[TokenizedPair], epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Pair-DPO loss of the step's pairs and the per-pair sequence log-probs (for checks)."""
        with self.autocast:
            win, lose = self.batches(pairs, epoch)  # the encoder and the float mask in the compute dtype
            with torch.profiler.record_function("hf.policy_forward"):
                pw_t2i, pw_mmu = self.sequence_logps(self.policy, win)
                pl_t2i, pl_mmu = self.sequence_logps(self.policy, lose)
            with torch.no_grad(), torch.profiler.record_function("hf.reference_forward"):
                rw_t2i, rw_mmu = self.sequence_logps(self.ref_model, win)
                rl_t2i, rl_mmu = self.sequence_logps(self.ref_model, lose)
        loss = reference.pair_dpo_loss((pw_mmu, pl_mmu, rw_mmu, rl_mmu), (pw_t2i, pl_t2i, rw_t2i, rl_t2i),
                                       beta=self.beta)
        logps = {"und/chosen": pw_mmu, "und/rejected": pl_mmu, "gen/chosen": pw_t2i, "gen/rejected": pl_t2i,
                 "und/ref_chosen": rw_mmu, "und/ref_rejected": rl_mmu, "gen/ref_chosen": rw_t2i,
                 "gen/ref_rejected": rl_t2i}
        return loss, {k: v.detach() for k, v in logps.items()}

    def train_step(self, pairs: list[TokenizedPair], epoch: int) -> float:
        """One optimizer step; returns the loss."""
        self.policy.train()
        loss, _ = self.loss(pairs, epoch)
        with torch.profiler.record_function("hf.backward"):
            loss.backward()
        with torch.profiler.record_function("hf.optimizer"):
            params = [p for p in self.policy.parameters() if p.grad is not None]
            if self.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())
