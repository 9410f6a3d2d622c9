"""Batched generation with the unified model: MaskGIT image sampling with CFG, and KV-cached text decoding.

MaskGIT (Show-o's t2i_generate). Image slots start as [MASK]; for step s = 0 … T−1:

    ℓ   = (1 + g)·ℓ_cond − g·ℓ_uncond        over the image-code columns only (cond and uncond rows in ONE batch)
    x̂   ~ softmax(ℓ)  at unknown slots; known slots keep their code
    r   = (s + 1)/T;  n_mask = clamp(floor(N·cos(πr/2)), 1, #unknown − 1)   (in float32, as Show-o)
    c   = log p(x̂) + τ_s·Gumbel,   known slots +∞;  the n_mask lowest-confidence slots are masked again
    τ_s = τ_0·(1 − r)                        (``compounding_noise=True``: Show-o's τ ← τ·(1 − r) every step)

returns the last x̂ (every slot filled). The text part of a t2i sequence never attends to the image block, so its
keys/values are computed once per call (KV cache) and each step runs only the N + 2 image-block tokens.

With one generator per prompt (what curation passes; ``_maskgit_per_prompt``) each step draws a uniform pair per
(image, slot) from the prompt's generator, ``(M, 2, N)`` per prompt, so a prompt's images never depend on the batch.
x̂ is drawn by inverse CDF (the first k with cdf_k > u·cdf_K), vectorized over all rows and only at unknown slots: the
model's last layer and the head run there only (``forward(keep=)``), the head on the guided state
(1 + g)·h_cond − g·h_uncond (the head is affine, so that is ℓ above). Step 0 sees only [MASK] slots, so a prompt's M
images share one cond row and all images one uncond row. #unknown in the clamp is each row's own (rows differ there
only after exact confidence ties). On CPU the rows run in chunks of ~``_CPU_CHUNK_TOKENS`` tokens. A single generator
(or none) keeps the original sampler (``torch.multinomial`` at every slot), so its samples are unchanged.

Text decoding (Show-o's mmu_generate, batched): the prompt ``[mmu][soi] image [eoi] [sot] question`` — the
bidirectional image block included — is prefilled once into a KV cache, then one token per step for every row;
greedy (temperature 0) or temperature + top-k sampling, restricted to the text vocabulary; a row stops at eos, the
batch when all rows did or at ``max_new_tokens``. ``num_return_sequences`` K reuses one prefill for K samples.
``use_cache=False`` recomputes the whole sequence every step (the original's way; for tests and benchmarks).

Several questions about one image (self-VQA: ``generate_answers(model, layout, codes (B, N), prompts[b][j])`` →
``answers[b][j]``): the image prefix ``[mmu][soi] image [eoi]`` (positions 0 … N + 2) is prefilled once per image,
its KV-cache rows repeated to the image's Q_b prompts (``KVCache.repeat_interleave`` with per-image counts), then
all Σ Q_b prompts run in one forward, left-padded *after* the prefix:

    row (b, j):  prefix_b (cached) | pad … pad [sot] prompt_bj | answer …
    positions:   0 … N + 2         | N + 3 … (the prompt where it sits unshared) | then + 1 per token

pad keys are masked for every query (a pad query sees the prefix and itself; its state is never read), so each row
attends to exactly the keys of its unshared ``generate_text`` row at the same positions: the same answers, for one
prefix forward per image instead of one per question. Both forwards run their last layer at the one position
decoding reads (``forward(keep=)``: [eoi], the last prompt token). Decoding is then the loop above.

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

__all__ = ["cosine_schedule", "generate_answers", "generate_images", "generate_text", "noise_schedule",
           "scheduled_masks"]

_CPU_CHUNK_TOKENS = 2048  # tokens per forward on CPU in the per-prompt sampler (see _chunk_images)


def cosine_schedule(ratio: Tensor | float) -> Tensor:
    """Show-o/MaskGIT mask ratio: cos(π·r/2), in float64 (training's mask draw)."""
    return torch.cos(math.pi / 2 * torch.as_tensor(ratio, dtype=torch.float64))


def scheduled_masks(num_tokens: int, step: int, steps: int) -> int:
    """floor(N·cos(π·r/2)) with r = (step + 1)/steps, in float32 as Show-o's ``t2i_generate`` computes it (its
    ``torch.tensor(ratio)`` is float32): at 12 or 18 steps one step re-masks one token fewer than float64 would. Not yet
    clamped to [1, #unknown − 1]."""
    ratio = torch.tensor(1.0 * (step + 1) / steps, dtype=torch.float32)
    return int((num_tokens * torch.cos(ratio * math.pi * 0.5)).floor())


def noise_schedule(noise_temperature: float, steps: int, compounding: bool = False) -> list[float]:
    """τ_s of each step s: τ₀·(1 − r_s) (MaskGIT's), or with ``compounding`` Show-o's τ_s = τ_{s−1}·(1 − r_s)
    (its ``t2i_generate`` reassigns ``temperature`` every step), r_s = (s + 1)/steps."""
    out, tau = [], noise_temperature
    for s in range(steps):
        ratio = (s + 1) / steps
        tau = tau * (1 - ratio) if compounding else noise_temperature * (1 - ratio)
        out.append(tau)
    return out


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
        gd = device if generator is None else generator.device  # a CPU generator may drive a CUDA model
        return torch.rand(shape, generator=generator, device=gd, dtype=torch.float64).to(device)
    rows = [torch.rand(shape[1:], generator=g, device=g.device, dtype=torch.float64) for g in gens]
    return torch.stack(rows).to(device)


def _multinomial(probs: Tensor, generator: Generators, gens: list | None, per_row: int = 1) -> Tensor:
    """One draw per row of ``probs`` (rows, K); with per-row generators row i uses gens[i // per_row].

    A generator on another device than ``probs`` (CPU generators driving a CUDA model, as curation's per-record
    ones do) draws one uniform per row there, and the rows are drawn together by inverse CDF on ``probs``' device."""
    rows, dev = probs.shape[0], probs.device
    if gens is None:
        if generator is None or generator.device == dev:
            return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        gens, per_row = [generator], rows  # one generator for every row: drawn below like per-row ones
    if all(g.device == dev for g in gens):
        out = [torch.multinomial(probs[i:i + per_row], 1, generator=g).squeeze(-1)
               for i, g in zip(range(0, rows, per_row), gens)]
        return torch.cat(out)
    u = torch.cat([torch.rand(min(per_row, rows - i), 1, generator=g, device=g.device, dtype=torch.float64)
                   for i, g in zip(range(0, rows, per_row), gens)])
    return _inverse_cdf(probs.log(), u.to(dev))[0].squeeze(-1)


def _gumbel(shape, generator: Generators, gens: list | None, device) -> Tensor:
    return _gumbel_of(_rand(shape, generator, gens, device))


def _gumbel_of(u: Tensor) -> Tensor:
    """Gumbel(0, 1) noise from uniforms [0, 1)."""
    return -torch.log(-torch.log(u.clamp(1e-20, 1.0)))


def _inverse_cdf(logits: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Draws from softmax(logits) by inverse CDF: logits (n, K), uniforms u (n, m) in [0, 1) → codes (n, m) int64 and
    their probabilities (n, m); row i's m draws share its cdf. Vectorized: the rows' randomness is all in ``u``.

    A draw is the first k with cdf[k] > u·cdf[K−1] (unnormalized cdf), so a zero-probability code (a flat step of the
    cdf) is never drawn; u·total is kept strictly below total against float rounding."""
    e = (logits - logits.amax(-1, keepdim=True)).exp_()  # (n, K), max 1
    cdf = e.cumsum(-1)
    total = cdf[:, -1:]  # (n, 1) ≥ 1
    x = (u.to(cdf.dtype) * total).minimum(torch.nextafter(total, torch.zeros_like(total)))
    code = torch.searchsorted(cdf, x.contiguous(), right=True)  # (n, m)
    return code, e.gather(-1, code) / total


def _guided_logits(h: Tensor, n: int, g: float, head: tuple[Tensor, Tensor]) -> Tensor:
    """Image-code logits (n, U, K) fp32 from states h: n cond rows then (g ≠ 0) n or 1 uncond rows, (·, U, d). The
    head is affine, so (1 + g)·ℓ_cond − g·ℓ_uncond = head((1 + g)·h_cond − g·h_uncond): one head on n rows."""
    W, b = head
    h = h.to(W.dtype)
    if g != 0:
        h = torch.lerp(h[n:], h[:n], 1 + g)
    return F.linear(h, W, b).float()


def _remask(codes: Tensor, idx: Tensor, valid: Tensor, draw: Tensor, p: Tensor, u_noise: Tensor, tau: float,
            n_sched: int) -> tuple[Tensor, Tensor]:
    """The confidence re-masking of one step. codes (n, N); draw, p (n, U): codes drawn at slots ``idx`` (n, U) and
    their probabilities, ``valid`` (n, U) where those slots were unknown; u_noise (n, N) the Gumbel uniforms.
    → codes with the draws in, and the new unknown slots (n, N): per row the k = max(1, min(n_sched, #unknown − 1))
    lowest log p + τ·Gumbel."""
    draw = torch.where(valid, draw, codes.gather(1, idx))
    conf = torch.log(p.double().clamp_min(1e-30)) + tau * _gumbel_of(u_noise.gather(1, idx))
    conf = conf.masked_fill(~valid, float("inf"))  # known slots are never masked again
    k = (valid.sum(-1) - 1).clamp(max=n_sched).clamp(min=1)
    cutoff = conf.sort(dim=-1).values.gather(1, (k - 1).unsqueeze(1))  # the k-th lowest confidence
    remask = (conf <= cutoff) & valid
    return codes.scatter(1, idx, draw), torch.zeros_like(codes, dtype=torch.bool).scatter(1, idx, remask)


def _chunk_images(images: int, tokens_per_image: int, device: torch.device) -> int:
    """Images per forward: on CPU as many as fill ~_CPU_CHUNK_TOKENS tokens, elsewhere all of them at once. On CPU
    big activations cost page faults: glibc hands buffers of several MB back to the OS and faults them in again on
    the next forward (one 512-row batch ran ~25% slower than 64-row chunks; 4,096-token chunks took ~10× the faults
    of 2,048-token ones and ~10% longer, while without the faults both ran alike)."""
    if device.type != "cpu":
        return images
    return max(1, min(images, _CPU_CHUNK_TOKENS // tokens_per_image))


class _Chunk:
    """The rows of images [a, b): their cond rows, then (CFG) their uncond rows; per forward part (both in one, or
    cond and uncond apart) a KV cache of the text prefix and the dense image-block mask, both built once
    (``use_text_cache``), or the full sequence's mask. ``hidden`` → states at chosen image slots (rows, U, d)."""

    def __init__(self, model: UnifiedTransformer, seqs: Sequences, rows: Tensor, parts: int, L0: int, N: int,
                 cached: bool):
        self.model, self.L0, self.N = model, L0, N
        self.ids, self.pos, mask = seqs.input_ids[rows], seqs.position_ids[rows], seqs.mask[rows]
        n = rows.numel() // parts
        self.parts = [slice(i * n, (i + 1) * n) for i in range(parts)]
        self.caches, self.masks = [], []
        for p in self.parts:
            if cached:
                c = model.new_cache(n, L0 + N + 2)
                model(self.ids[p, :L0], mask[p].dense()[:, :L0, :L0].unsqueeze(1), self.pos[p, :L0], cache=c)
                self.caches.append(c)
                self.masks.append(mask[p].dense(q_start=L0).unsqueeze(1))  # (n, 1, N + 2, L0 + N + 2)
            else:
                self.caches.append(None)
                self.masks.append(mask[p])

    def hidden(self, block: Tensor, slots: Tensor) -> Tensor:
        """Hidden states (rows, U, d) at image slots ``slots`` (images, U) of each row, the slots holding ``block``
        (images, N) token ids. Only those are computed in the last layer (``UnifiedTransformer.forward(keep=)``)."""
        L0, N = self.L0, self.N
        copies = self.ids.shape[0] // block.shape[0]
        self.ids[:, L0 + 1:L0 + 1 + N] = block.repeat(copies, 1)
        slots = slots.repeat(copies // len(self.parts), 1) + 1  # positions in the image block [soi] slots [eoi]
        out = []
        for p, c, m in zip(self.parts, self.caches, self.masks):
            if c is not None:
                c.length = L0  # the text keys stay; the image block is rewritten after them every step
                out.append(self.model(self.ids[p, L0:], m, self.pos[p, L0:], cache=c, keep=slots))
            else:
                out.append(self.model(self.ids[p], m, self.pos[p], keep=slots + L0))
        return torch.cat(out) if len(out) > 1 else out[0]


def _maskgit_step(chunk: _Chunk, codes: Tensor, unknown: Tensor, u: Tensor, head: tuple[Tensor, Tensor], g: float,
                  n_sched: int, tau: float, vocab) -> tuple[Tensor, Tensor]:
    """One MaskGIT step for a chunk's images: codes (n, N) int64, unknown (n, N) bool, u (n, 2, N) uniforms (the
    draw's, the Gumbel noise's) → the new codes and unknown slots. Past the forward, work is at unknown slots only."""
    n = codes.shape[0]
    count = unknown.sum(-1)  # (n,)
    U = int(count.max())
    idx = torch.sort((~unknown).to(torch.uint8), dim=-1, stable=True).indices[:, :U]  # (n, U): unknown slots first
    valid = torch.arange(U, device=idx.device) < count.unsqueeze(1)  # all True unless rows differ in count
    h = chunk.hidden(torch.where(unknown, vocab.mask, codes + vocab.image_offset), idx)  # (copies·n, U, d)
    draw, p = _inverse_cdf(_guided_logits(h, n, g, head).view(n * U, -1), u[:, 0].gather(1, idx).view(-1, 1))
    return _remask(codes, idx, valid, draw.view(n, U), p.view(n, U), u[:, 1], tau, n_sched)


def _first_step(model: UnifiedTransformer, seqs: Sequences, P: int, M: int, L0: int, N: int, u: Tensor,
                head: tuple[Tensor, Tensor], g: float, n_sched: int, tau: float) -> tuple[Tensor, Tensor]:
    """Step 0, when every slot of every row is [MASK]: a prompt's M images share one cond row and all images one
    uncond row, so one forward of P (+ 1) rows gives the logits, and each (prompt, slot) cdf serves its M draws."""
    dev = seqs.input_ids.device
    R = P * M
    per = max(1, _CPU_CHUNK_TOKENS // (L0 + N + 2)) if dev.type == "cpu" else P
    rows = [torch.arange(a, min(a + per, P), device=dev) * M for a in range(0, P, per)]
    if g != 0:
        rows.append(torch.tensor([R], device=dev))  # the uncond row (the empty prompt)
    slots = L0 + 1 + torch.arange(N, device=dev)
    h = torch.cat([model(seqs.input_ids[r], seqs.mask[r], seqs.position_ids[r], keep=slots.expand(r.numel(), N))
                   for r in rows])  # (P (+ 1), N, d)
    logits = _guided_logits(h, P, g, head)  # (P, N, K)
    draw, p = _inverse_cdf(logits.view(P * N, -1), u[:, 0].reshape(P, M, N).transpose(1, 2).reshape(P * N, M))
    draw, p = (t.view(P, N, M).transpose(1, 2).reshape(R, N) for t in (draw, p))
    codes = torch.zeros(R, N, dtype=torch.long, device=dev)
    idx = torch.arange(N, device=dev).expand(R, N)
    return _remask(codes, idx, torch.ones(R, N, dtype=torch.bool, device=dev), draw, p, u[:, 1], tau, n_sched)


def _maskgit_per_prompt(model: UnifiedTransformer, layout: Layout, seqs: Sequences, gens: Sequence[torch.Generator],
                        M: int, N: int, steps: int, g: float, noise_temperature: float, compounding_noise: bool,
                        use_text_cache: bool, cfg_batched: bool) -> Tensor:
    """MaskGIT with one generator per prompt (see the module docstring) → codes (len(gens)·M, N)."""
    v = layout.vocab
    dev = model.lm_head.weight.device
    P, K, L0 = len(gens), v.num_image_codes, layout.t2i_text_len
    R = P * M
    W = model.lm_head.weight[v.image_offset:v.image_offset + K]  # (K, d): image-code columns only
    dt = torch.promote_types(W.dtype, torch.float32)  # guided states in ≥ fp32 (they difference two states)
    head = (W.to(dt), model.lm_head.bias[v.image_offset:v.image_offset + K].to(dt))
    copies = 2 if g != 0 else 1
    parts = 1 if (cfg_batched or g == 0) else 2
    chunks = []
    taus = noise_schedule(noise_temperature, steps, compounding_noise)
    for s in range(steps):
        u = torch.stack([torch.rand((M, 2, N), generator=gp, device=gp.device, dtype=torch.float64).to(dev)
                         for gp in gens]).view(R, 2, N)  # per (image, slot): the draw's uniform, the Gumbel noise's
        n_sched, tau = scheduled_masks(N, s, steps), taus[s]
        if s == 0:
            codes, unknown = _first_step(model, seqs, P, M, L0, N, u, head, g, n_sched, tau)
            continue
        if not chunks:  # the rows of every later step, in chunks, with their text prefix cached once
            n_img = _chunk_images(R, copies * (N + 2 + (0 if use_text_cache else L0)), dev)
            for a in range(0, R, n_img):
                img = torch.arange(a, min(a + n_img, R), device=dev)
                rows = torch.cat([img + i * R for i in range(copies)])
                chunks.append((slice(a, a + img.numel()), _Chunk(model, seqs, rows, parts, L0, N, use_text_cache)))
        for rows, chunk in chunks:
            codes[rows], unknown[rows] = _maskgit_step(chunk, codes[rows], unknown[rows], u[rows], head, g, n_sched,
                                                       tau, v)
    return codes


@torch.no_grad()
def generate_images(
    model: UnifiedTransformer, layout: Layout, texts: Sequence[Sequence[int]], num_tokens: int,
    images_per_prompt: int = 1, steps: int = 50, guidance_scale: float = 5.0, noise_temperature: float = 1.0,
    compounding_noise: bool = False, generator: Generators = None, use_text_cache: bool = True,
    cfg_batched: bool = True,
) -> Tensor:
    """MaskGIT t2i sampling → codes (len(texts)·images_per_prompt, num_tokens) int64 in [0, num_image_codes).

    ``generator``: one torch.Generator for the call, or one per prompt (then each prompt's images depend only on
    its own generator, whatever the batch: what sharded curation needs to match a one-process run; this path draws
    by inverse CDF at unknown slots only, see the module docstring: same distribution, other values than one
    generator's ``torch.multinomial``).

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
    if gens is not None:
        return _maskgit_per_prompt(model, layout, seqs, list(generator), images_per_prompt, N, steps, g,
                                   noise_temperature, compounding_noise, use_text_cache, cfg_batched)
    ids, pos, mask = seqs.input_ids, seqs.position_ids, seqs.mask
    L0 = layout.t2i_text_len  # the text part; the image block [soi] slots [eoi] follows
    slots = slice(L0 + 1, L0 + 1 + N)
    W = model.lm_head.weight[v.image_offset:v.image_offset + K]  # (K, d): image-code columns only
    bias = model.lm_head.bias[v.image_offset:v.image_offset + K]

    def code_logits(part: slice, cache) -> Tensor:
        if cache is not None:
            cache.length = L0  # the text keys stay; the image block is rewritten after them every step
            h = model(ids[part, L0:], step_masks[part.start], pos[part, L0:], cache=cache)[:, 1:1 + N]
        else:
            h = model(ids[part], mask[part], pos[part])[:, slots]
        return (h @ W.T + bias).float()  # (rows, N, K)

    parts = [slice(0, len(rows))] if (cfg_batched or g == 0) else [slice(0, R), slice(R, 2 * R)]
    caches, step_masks = [], {}
    for part in parts:
        if use_text_cache:
            n = part.stop - part.start
            c = model.new_cache(n, L0 + N + 2)
            model(ids[part, :L0], mask[part].dense()[:, :L0, :L0].unsqueeze(1), pos[part, :L0], cache=c)
            caches.append(c)
            step_masks[part.start] = mask[part].dense(q_start=L0).unsqueeze(1)  # constant over steps: built once
        else:
            caches.append(None)

    taus = noise_schedule(noise_temperature, steps, compounding_noise)
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
        n_unknown = int(unknown.sum(-1).max())
        n_mask = max(1, min(scheduled_masks(N, s, steps), n_unknown - 1))
        tau = taus[s]
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


def _decode(model: UnifiedTransformer, layout: Layout, h: Tensor, last_pos: Tensor, step, max_new_tokens: int,
            temperature: float, top_k: int | None, generator: Generators, gens: list | None) -> list[list[int]]:
    """The decoding loop: from the states ``h`` (rows, d) of each row's last prompt token at positions ``last_pos``
    (rows,), one token per row per step from the text vocabulary (captions are text: codes and specials are never
    emitted); ``step(tok, pos)`` (rows,), (rows,) → the next states (rows, d). A row stops at eos (pad after), the
    batch when all rows did or at ``max_new_tokens`` → each row's tokens without its eos."""
    v = layout.vocab
    W_text, b_text = model.lm_head.weight[: v.text_vocab_size], model.lm_head.bias[: v.text_vocab_size]
    rows = h.shape[0]
    out = torch.full((rows, max_new_tokens), v.pad, dtype=torch.long, device=h.device)
    done = torch.zeros(rows, dtype=torch.bool, device=h.device)
    for t in range(max_new_tokens):
        logits = F.linear(h, W_text, b_text)  # (rows, text vocab): the head on the last position only
        tok = _next_token(logits, temperature, top_k, generator, gens)
        tok = torch.where(done, torch.full_like(tok, v.pad), tok)
        out[:, t] = tok
        done |= tok == v.eos
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        last_pos = last_pos + 1
        h = step(tok, last_pos)
    result = []
    for row in out.tolist():
        toks = []
        for x in row:
            if x in (v.eos, v.pad):
                break
            toks.append(x)
        result.append(toks)
    return result


def _cached_step(model: UnifiedTransformer, cache, key_valid: Tensor):
    """A decoding step on a KV cache: the new token attends to every valid key so far (``key_valid`` (rows, max_len):
    False at padding) and to itself."""

    def step(tok: Tensor, pos: Tensor) -> Tensor:
        m = key_valid[:, : cache.length + 1]
        return model(tok.unsqueeze(1), m[:, None, None, :], pos.unsqueeze(1), cache=cache)[:, -1]

    return step


@torch.no_grad()
def generate_text(
    model: UnifiedTransformer, layout: Layout, codes: Tensor, prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 100, temperature: float = 0.0, top_k: int | None = None, num_return_sequences: int = 1,
    generator: Generators = None, use_cache: bool = True, sot: bool = True,
) -> list[list[int]]:
    """Answers/captions for ``codes`` (B, N) with ``prompts`` → B·K token lists (row-major: image 0's K first),
    each without its eos; a row that hits ``max_new_tokens`` ends there. ``generator``: one, or one per image.
    Several prompts about one image: ``generate_answers`` prefills the image once."""
    dev = model.lm_head.weight.device
    seqs = layout.mmu(codes, prompts, answers=None, sot=sot, pad_to=False).to(dev)
    ids, pos, mask = _left_align(seqs)
    B, T = ids.shape
    Kr = num_return_sequences
    gens = _rows_of(generator, B * Kr, repeats=Kr)  # one generator per image: independent of batching
    if use_cache:
        cache = model.new_cache(B, T + max_new_tokens)
        h = model(ids, mask, pos, cache=cache)[:, -1]
        key_valid = torch.cat([mask.valid, torch.ones(B, max_new_tokens, dtype=torch.bool, device=dev)], 1)
        if Kr > 1:
            cache = cache.repeat_interleave(Kr)
            h, key_valid = h.repeat_interleave(Kr, 0), key_valid.repeat_interleave(Kr, 0)
        return _decode(model, layout, h, pos[:, -1].repeat_interleave(Kr, 0), _cached_step(model, cache, key_valid),
                       max_new_tokens, temperature, top_k, generator, gens)
    ids, pos = ids.repeat_interleave(Kr, 0), pos.repeat_interleave(Kr, 0)
    mask = OmniMask(*(t.repeat_interleave(Kr, 0) for t in (mask.valid, mask.block, mask.branch)))
    seq = [ids, mask, pos]  # (input_ids, attention_mask, position_ids), one token longer every step

    def recompute(tok: Tensor, p: Tensor) -> Tensor:  # the whole sequence again
        ids, m, pos = seq
        seq[:] = [torch.cat([ids, tok.unsqueeze(1)], 1),
                  OmniMask(torch.cat([m.valid, torch.ones_like(tok, dtype=torch.bool).unsqueeze(1)], 1),
                           torch.cat([m.block, torch.full_like(m.block[:, :1], -1)], 1),
                           torch.cat([m.branch, torch.zeros_like(m.branch[:, :1])], 1)),
                  torch.cat([pos, p.unsqueeze(1)], 1)]
        return model(*seq)[:, -1]

    return _decode(model, layout, model(ids, mask, pos)[:, -1], pos[:, -1], recompute, max_new_tokens, temperature,
                   top_k, generator, gens)


@torch.no_grad()
def generate_answers(
    model: UnifiedTransformer, layout: Layout, image_codes: Tensor, prompts: Sequence[Sequence[Sequence[int]]],
    max_new_tokens: int = 100, temperature: float = 0.0, top_k: int | None = None, generator: Generators = None,
    sot: bool = True,
) -> list[list[list[int]]]:
    """Answers to several prompts per image: ``image_codes`` (B, N), ``prompts[b]`` the prompts about image b (any
    number, 0 included) → ``answers[b][j]``, the tokens ``generate_text`` gives row (image b, prompt j), without eos.

    The image prefix ``[mmu][soi] image [eoi]`` is prefilled once per image, its cache rows repeated to the image's
    prompts, then the prompts run left-padded after it (pad keys never attended, positions as unshared); see the
    module docstring. ``generator``: one, or one per answer row (image-major, like the flattened ``prompts``)."""
    v = layout.vocab
    dev = model.lm_head.weight.device
    if not isinstance(image_codes, Tensor) or image_codes.dim() != 2 or image_codes.shape[0] != len(prompts):
        shape = tuple(image_codes.shape) if isinstance(image_codes, Tensor) else type(image_codes).__name__
        raise ValueError(f"generate_answers: image_codes must be (B, N) with one prompt list per image; got "
                         f"{shape} and {len(prompts)} prompt lists")
    counts = [len(ps) for ps in prompts]
    texts = []  # (Q,) the prompt part of each answer row: ([sot]) prompt
    for b, ps in enumerate(prompts):
        for j, p in enumerate(ps):
            v.check_text(p, f"generate_answers prompt {j} of image {b}")
            texts.append(([v.bos] if sot else []) + list(p))
    Q = len(texts)
    gens = _rows_of(generator, Q)
    if Q == 0:
        return [[] for _ in prompts]
    used = [b for b, c in enumerate(counts) if c]  # images without prompts are not prefilled
    seqs = layout.mmu(image_codes[used], [[] for _ in used], sot=False, pad_to=False).to(dev)
    Lp = seqs.input_ids.shape[1]  # the prefix: positions 0 … Lp − 1, as in every unshared row
    P = max(len(t) for t in texts)
    cache = model.new_cache(len(used), Lp + P + max_new_tokens)
    last = torch.full((len(used), 1), Lp - 1, device=dev)  # the last layer runs at [eoi] only (``keep``)
    h = model(seqs.input_ids, seqs.mask, seqs.position_ids, cache=cache, keep=last)[:, -1]  # (B', d)
    rep = torch.tensor([counts[b] for b in used], device=dev)
    cache = cache.repeat_interleave(rep)  # (Q rows): each image's prefix keys/values once per prompt
    h = h.repeat_interleave(rep, 0)
    n = torch.tensor([len(t) for t in texts], device=dev)  # (Q,)
    ids = torch.full((Q, P), v.pad, dtype=torch.long)
    for r, t in enumerate(texts):
        ids[r, P - len(t):] = torch.tensor(t, dtype=torch.long)
    ids = ids.to(dev)
    col = torch.arange(P, device=dev)
    valid = col >= (P - n).unsqueeze(1)  # (Q, P): left padding False
    key_valid = torch.cat([torch.ones(Q, Lp, dtype=torch.bool, device=dev), valid,
                           torch.ones(Q, max_new_tokens, dtype=torch.bool, device=dev)], 1)
    if P:
        pos = Lp + (col - (P - n).unsqueeze(1)).clamp(min=0)  # (Q, P): prompt token j at Lp + j (pads: Lp)
        j = torch.arange(Lp + P, device=dev)
        q = Lp + col.unsqueeze(1)  # (P, 1) query columns
        see = (j <= q) & key_valid[:, None, :Lp + P]  # (Q, P, Lp + P): the prefix and valid earlier prompt tokens
        see |= j == q  # a pad query sees itself too (no empty row; its state is never read)
        hp = model(ids, see.unsqueeze(1), pos, cache=cache, keep=torch.full((Q, 1), P - 1, device=dev))[:, -1]
        h = torch.where((n > 0).unsqueeze(1), hp, h)  # an empty prompt decodes from the [eoi] state
    flat = _decode(model, layout, h, Lp - 1 + n, _cached_step(model, cache, key_valid), max_new_tokens,
                   temperature, top_k, generator, gens)
    out, k = [], 0
    for c in counts:
        out.append(flat[k:k + c])
        k += c
    return out
