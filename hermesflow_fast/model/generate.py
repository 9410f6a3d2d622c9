"""Batched generation with the unified model: MaskGIT image sampling with CFG, and KV-cached text decoding.

MaskGIT (Show-o's t2i_generate, spec §5.6). Image slots start as [MASK]; for step s = 0 … T−1:

    ℓ   = (1 + g)·ℓ_cond − g·ℓ_uncond        over the image-code columns only (cond and uncond rows in ONE batch)
    x̂   ~ softmax(ℓ)  at unknown slots; known slots keep their code
    r   = (s + 1)/T;  n_mask = clamp(floor(N·cos(πr/2)), 1, #unknown − 1)
    c   = log p(x̂) + τ_s·Gumbel,   known slots +∞;  the n_mask lowest-confidence slots are masked again
    τ_s = τ_0·(1 − r)                        (``compounding_noise=True``: Show-o's τ ← τ·(1 − r) every step)

returns the last x̂ (every slot filled). The text part of a t2i sequence never attends to the image block, so its
keys/values are computed once per call (KV cache) and each step runs only the N + 2 image-block tokens.

Text decoding (mmu_generate, spec §5.8, batched): the prompt ``[mmu][soi] image [eoi] [sot] question`` — the
bidirectional image block included — is prefilled once into a KV cache, then one token per step for every row;
greedy (temperature 0) or temperature + top-k sampling, restricted to the text vocabulary; a row stops at eos, the
batch when all rows did or at ``max_new_tokens``. ``num_return_sequences`` K reuses one prefill for K samples.
``use_cache=False`` recomputes the whole sequence every step (the original's way; for tests and benchmarks).

    python -m pytest -q tests/model/test_generate.py
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from hermesflow_fast.model.layout import Layout, Sequences
from hermesflow_fast.model.masks import OmniMask
from hermesflow_fast.model.transformer import UnifiedTransformer

__all__ = ["cosine_schedule", "generate_images", "generate_text"]


def cosine_schedule(ratio: Tensor | float) -> Tensor:
    """Show-o/MaskGIT mask ratio: cos(π·r/2)."""
    return torch.cos(math.pi / 2 * torch.as_tensor(ratio, dtype=torch.float64))


Generators = torch.Generator | Sequence[torch.Generator] | None


def _rows_of(generator: Generators, rows: int, repeats: int = 1) -> list | None:
    """One generator per output row (a list given per prompt/image is repeated ``repeats`` times), or None."""
    if generator is None or isinstance(generator, torch.Generator):
        return None
    gens = [g for g in generator for _ in range(repeats)]
    if len(gens) != rows:
        raise ValueError(f"{len(generator)} generators for {rows // repeats} rows: pass one per prompt/image or one")
    return gens


def _rand(shape, generator: Generators, gens: list | None, device) -> Tensor:
    """Uniform [0, 1) float64 of ``shape``; with per-row generators each row draws from its own."""
    if gens is None:
        return torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    return torch.stack([torch.rand(shape[1:], generator=g, device=device, dtype=torch.float64) for g in gens])


def _multinomial(probs: Tensor, generator: Generators, gens: list | None, per_row: int = 1) -> Tensor:
    """One draw per row of ``probs`` (rows, K); with per-row generators row i uses gens[i // per_row]."""
    if gens is None:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    out = [torch.multinomial(probs[i:i + per_row], 1, generator=g).squeeze(-1)
           for i, g in zip(range(0, probs.shape[0], per_row), gens)]
    return torch.cat(out)


def _gumbel(shape, generator: Generators, gens: list | None, device) -> Tensor:
    u = _rand(shape, generator, gens, device).clamp_(1e-20, 1.0)
    return -torch.log(-torch.log(u))


@torch.no_grad()
def generate_images(
    model: UnifiedTransformer, layout: Layout, texts: Sequence[Sequence[int]], num_tokens: int,
    images_per_prompt: int = 1, steps: int = 50, guidance_scale: float = 5.0, noise_temperature: float = 1.0,
    compounding_noise: bool = False, generator: Generators = None, use_text_cache: bool = True,
    cfg_batched: bool = True,
) -> Tensor:
    """MaskGIT t2i sampling → codes (len(texts)·images_per_prompt, num_tokens) int64 in [0, num_image_codes).

    ``generator``: one torch.Generator for the call, or one per prompt (then each prompt's images depend only on
    its own generator, whatever the batch: what sharded curation needs to match a one-process run).

    Rows are ordered prompt-major (prompt 0's M images first). ``cfg_batched=False`` runs cond and uncond as two
    forwards (the benchmark's baseline); ``use_text_cache=False`` recomputes the text prefix every step.
    """
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    if num_tokens < 2:
        raise ValueError(f"num_tokens must be ≥ 2, got {num_tokens}")
    v = layout.vocab
    dev = model.lm_head.weight.device
    rows = [list(t) for t in texts for _ in range(images_per_prompt)]
    R, N, K = len(rows), num_tokens, v.num_image_codes
    gens = _rows_of(generator, R, repeats=images_per_prompt)  # per-prompt generators: results independent of batching
    g = float(guidance_scale)
    if g != 0:
        rows = rows + [[] for _ in range(R)]  # unconditional rows: the empty prompt
    blank = torch.zeros(len(rows), N, dtype=torch.long)
    seqs = layout.t2i(rows, blank, torch.ones(len(rows), N, dtype=torch.bool)).to(dev)
    ids, pos, mask = seqs.input_ids, seqs.position_ids, seqs.mask
    L0 = layout.t2i_text_len  # the text part; the image block [soi] slots [eoi] follows
    slots = slice(L0 + 1, L0 + 1 + N)
    W = model.lm_head.weight[v.image_offset:v.image_offset + K]  # (K, d): image-code columns only
    bias = model.lm_head.bias[v.image_offset:v.image_offset + K]

    def code_logits(part: slice, cache) -> Tensor:
        if cache is not None:
            cache.length = L0  # the text keys stay; the image block is rewritten after them every step
            h = model(ids[part, L0:], mask[part].dense(q_start=L0).unsqueeze(1), pos[part, L0:], cache=cache)
            h = h[:, 1:1 + N]
        else:
            h = model(ids[part], mask[part], pos[part])[:, slots]
        return (h @ W.T + bias).float()  # (rows, N, K)

    parts = [slice(0, len(rows))] if (cfg_batched or g == 0) else [slice(0, R), slice(R, 2 * R)]
    caches = []
    for part in parts:
        if use_text_cache:
            n = part.stop - part.start
            c = model.new_cache(n, L0 + N + 2)
            model(ids[part, :L0], mask[part].dense()[:, :L0, :L0].unsqueeze(1), pos[part, :L0], cache=c)
            caches.append(c)
        else:
            caches.append(None)

    tau = noise_temperature
    sampled = torch.zeros(R, N, dtype=torch.long, device=dev)
    for s in range(steps):
        logits = torch.cat([code_logits(p, c) for p, c in zip(parts, caches)], 0)
        if g != 0:
            logits = (1 + g) * logits[:R] - g * logits[R:]
        probs = torch.softmax(logits, dim=-1)  # (R, N, K)
        draw = _multinomial(probs.view(-1, K), generator, gens, per_row=N).view(R, N)
        cur = ids[:R, slots]
        unknown = cur == v.mask
        sampled = torch.where(unknown, draw, cur - v.image_offset)
        ratio = (s + 1) / steps
        n_unknown = int(unknown.sum(-1).max())
        n_mask = int(math.floor(N * float(cosine_schedule(ratio))))
        n_mask = max(1, min(n_mask, n_unknown - 1))
        tau = tau * (1 - ratio) if compounding_noise else noise_temperature * (1 - ratio)
        p_sel = probs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1).double()
        conf = torch.log(p_sel.clamp_min(1e-30)) + tau * _gumbel((R, N), generator, gens, dev)
        conf = conf.masked_fill(~unknown, float("inf"))
        cutoff = conf.sort(dim=-1).values[:, n_mask - 1:n_mask]  # the n_mask-th lowest confidence
        remask = conf <= cutoff
        new = torch.where(remask, torch.full_like(sampled, v.mask), sampled + v.image_offset)
        ids[:R, slots] = new
        if g != 0:
            ids[R:, slots] = new
    return sampled


def _left_align(seqs: Sequences) -> tuple[Tensor, Tensor, OmniMask]:
    """Right-padded prompts → left-padded (every row ends at the last column), tags and positions moved along."""
    valid = seqs.mask.valid
    T = valid.shape[1]
    n = valid.sum(1)
    idx = (torch.arange(T, device=valid.device).unsqueeze(0) - (T - n).unsqueeze(1)) % T  # (B, T) source column
    take = lambda t: t.gather(1, idx)  # noqa: E731
    m = seqs.mask
    return take(seqs.input_ids), take(seqs.position_ids), OmniMask(take(m.valid), take(m.block), take(m.branch))


def _next_token(logits: Tensor, temperature: float, top_k: int | None, generator: Generators,
                gens: list | None = None) -> Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return _multinomial(torch.softmax(logits, -1), generator, gens)


@torch.no_grad()
def generate_text(
    model: UnifiedTransformer, layout: Layout, codes: Tensor, prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 100, temperature: float = 0.0, top_k: int | None = None, num_return_sequences: int = 1,
    generator: Generators = None, use_cache: bool = True, sot: bool = True,
) -> list[list[int]]:
    """Answers/captions for ``codes`` (B, N) with ``prompts`` → B·K token lists (row-major: image 0's K first),
    each without its eos; a row that hits ``max_new_tokens`` ends there. ``generator``: one, or one per image."""
    v = layout.vocab
    dev = model.lm_head.weight.device
    seqs = layout.mmu(codes, prompts, answers=None, sot=sot, pad_to=False).to(dev)
    ids, pos, mask = _left_align(seqs)
    B, T = ids.shape
    Kr = num_return_sequences
    gens = _rows_of(generator, B * Kr, repeats=Kr)  # one generator per image: independent of batching
    W_text = model.lm_head.weight[: v.text_vocab_size]  # captions are text: codes and specials are never emitted
    b_text = model.lm_head.bias[: v.text_vocab_size]
    out = torch.full((B * Kr, max_new_tokens), v.pad, dtype=torch.long, device=dev)
    done = torch.zeros(B * Kr, dtype=torch.bool, device=dev)
    if use_cache:
        cache = model.new_cache(B, T + max_new_tokens)
        h = model(ids, mask, pos, cache=cache)[:, -1]
        if Kr > 1:
            cache = cache.repeat_interleave(Kr)
            h = h.repeat_interleave(Kr, 0)
        key_valid = torch.cat([mask.valid, torch.ones(B, max_new_tokens, dtype=torch.bool, device=dev)], 1)
        key_valid = key_valid.repeat_interleave(Kr, 0)
    else:
        ids, pos = ids.repeat_interleave(Kr, 0), pos.repeat_interleave(Kr, 0)
        mask = OmniMask(*(t.repeat_interleave(Kr, 0) for t in (mask.valid, mask.block, mask.branch)))
        h = model(ids, mask, pos)[:, -1]
    last_pos = pos[:, -1].repeat_interleave(Kr, 0) if use_cache else pos[:, -1]
    for t in range(max_new_tokens):
        logits = F.linear(h, W_text, b_text)  # (rows, text vocab): the head on the last position only
        tok = _next_token(logits, temperature, top_k, generator, gens)
        tok = torch.where(done, torch.full_like(tok, v.pad), tok)
        out[:, t] = tok
        done |= tok == v.eos
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        last_pos = last_pos + 1
        if use_cache:
            step_mask = key_valid[:, : cache.length + 1]
            h = model(tok.unsqueeze(1), step_mask[:, None, None, :], last_pos.unsqueeze(1), cache=cache)[:, -1]
        else:
            ids = torch.cat([ids, tok.unsqueeze(1)], 1)
            pos = torch.cat([pos, last_pos.unsqueeze(1)], 1)
            tags = OmniMask(torch.cat([mask.valid, torch.ones_like(done).unsqueeze(1)], 1),
                            torch.cat([mask.block, torch.full_like(mask.block[:, :1], -1)], 1),
                            torch.cat([mask.branch, torch.zeros_like(mask.branch[:, :1])], 1))
            mask = tags
            h = model(ids, mask, pos)[:, -1]
    result = []
    for row in out.tolist():
        toks = []
        for x in row:
            if x in (v.eos, v.pad):
                break
            toks.append(x)
        result.append(toks)
    return result
