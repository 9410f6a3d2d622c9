"""A HermesFlow-style curation pass, written from a description of the original's scripts, as the curation benchmark's
baseline. Per record, batch 1 throughout:

- captions: for each (top_k, temperature) of the grid, token by token WITHOUT a KV cache, the whole sequence and
  its full-vocabulary logits recomputed at every step (``mmu_generate``), top-k + temperature sampling;
- images: M images of the prompt in one batch with their unconditional rows in the same forward (as
  ``t2i_generate`` does: cond and uncond concatenated; ``cfg_batched=False`` runs the uncond rows as a second
  forward instead), the whole sequence recomputed every step (no text cache);
- self-VQA: every generated image decoded to pixels, written as PNG, read back and re-encoded by the image tokenizer
  (the original scores PNG files), then each question answered alone, greedy, without a KV cache.

Attention runs as the original's Phi runs it: SDPA with the dense mask (``attn_backend='sdpa'``; on CPU that is
what "auto" picks anyway). The same model, records and sampling settings as ours; only the execution differs.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from PIL import Image

from hermesflow_fast.benchmarks.measure import stage_timer
from hermesflow_fast.data.text import und_prompt_ids
from hermesflow_fast.model.generate import generate_images
from hermesflow_fast.selfplay.stages import vqa_question

__all__ = ["hermesflow_curation_pass"]


@torch.no_grad()
def _decode_uncached(wm, codes, prompt, max_new: int, temperature: float, top_k: int | None, gen) -> list[int]:
    v, lay, model = wm.vocab, wm.layout, wm.model
    s = lay.mmu(codes[None], [prompt], answers=None, sot=True, pad_to=False)
    ids, mask = s.input_ids.to(wm.device), s.mask.dense().to(wm.device)
    out: list[int] = []
    for _ in range(max_new):
        logits = model.logits(ids, mask)[:, -1, : v.text_vocab_size]  # full logits of every position computed
        if temperature <= 0:
            tok = logits.argmax(-1)
        else:
            z = logits / temperature
            if top_k is not None:
                kth = z.topk(top_k, -1).values[..., -1:]
                z = z.masked_fill(z < kth, float("-inf"))
            tok = torch.multinomial(torch.softmax(z, -1), 1, generator=gen)[:, 0]
        out.append(int(tok))
        if out[-1] == v.eos:
            break
        ids = torch.cat([ids, tok[:, None]], 1)
        T = ids.shape[1]
        grown = torch.zeros(1, T, T, dtype=torch.bool, device=mask.device)
        grown[:, :-1, :-1] = mask
        grown[:, -1] = True
        mask = grown
    return out


def _png_roundtrip(wm, codes: torch.Tensor) -> torch.Tensor:
    """codes (M, N) → pixels → PNG bytes → pixels → codes (M, N), as scoring PNG files does."""
    tok = wm.image_tokenizer
    pix = tok.decode(codes.to(tok.device)).clamp(-1, 1)
    out = []
    for img in pix:
        arr = ((img.permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        back = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32)
        out.append(torch.from_numpy(back).permute(2, 0, 1) / 127.5 - 1)
    return tok.encode(torch.stack(out).to(tok.device)).cpu()


@contextlib.contextmanager
def _sdpa(model):
    saved = model.config.attn_backend
    model.config.attn_backend = "sdpa"
    try:
        yield
    finally:
        model.config.attn_backend = saved


def hermesflow_curation_pass(wm, records, settings, answer_match, seed: int = 0,
                             stages: dict[str, float] | None = None, cfg_batched: bool = True) -> list[dict]:
    """K captions + M images + self-VQA for each record, one record at a time; returns per-record results.
    ``stages``: a dict that receives the seconds spent in "captions", "images" and "self_vqa" (PNG round trip in).
    ``cfg_batched``: cond and uncond rows in one forward per step (the original's ``t2i_generate``) or two."""
    with _sdpa(wm.model):
        return _pass(wm, records, settings, answer_match, seed, {} if stages is None else stages, cfg_batched)


def _pass(wm, records, settings, answer_match, seed: int, stages: dict[str, float], cfg_batched: bool
          ) -> list[dict]:
    from hermesflow_fast.data.text import prompt_ids

    tok, dev = wm.text_tokenizer, wm.device
    q = und_prompt_ids(tok, settings.caption_question)
    gen = torch.Generator(dev).manual_seed(seed)
    results = []
    for r in records:
        caps = []
        with stage_timer(stages, "captions", dev):
            for k, t in settings.grid():
                ids = _decode_uncached(wm, r.image_codes, q, settings.caption_tokens, t, None if t <= 0 else k, gen)
                caps.append(tok.decode(ids, skip_special_tokens=True).strip())
        with stage_timer(stages, "images", dev):
            codes = generate_images(wm.model, wm.layout, [prompt_ids(tok, r.prompt)], int(r.image_codes.numel()),
                                    images_per_prompt=settings.images_per_prompt, steps=settings.steps,
                                    guidance_scale=settings.guidance_scale,
                                    noise_temperature=settings.noise_temperature,
                                    compounding_noise=settings.compounding_noise, generator=gen, use_text_cache=False,
                                    cfg_batched=cfg_batched)
        with stage_timer(stages, "self_vqa", dev):
            codes = _png_roundtrip(wm, codes)
            acc = []
            for img in codes:
                right = 0
                for qu in r.questions:
                    ids = _decode_uncached(wm, img, und_prompt_ids(tok, vqa_question(qu, settings.vqa_prompt)),
                                           settings.answer_tokens, 0.0,
                                           None, gen)
                    said = tok.decode(ids, skip_special_tokens=True).strip()
                    right += int(answer_match(said, qu.choices) == qu.answer)
                acc.append(right / len(r.questions))
        results.append({"id": r.id, "captions": caps, "accuracy": acc})
    return results
