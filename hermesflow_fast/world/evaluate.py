"""The understanding–generation gap, measured the paper's way (Table 4) on held-out world records.

    und   accuracy of the MODEL's answers about the REAL image: every record's image is rendered, encoded by the
          world model's VQ tokenizer, and each of its questions is put as ``question.prompt`` in the
          "USER: … ASSISTANT:" template; KV-cached greedy decoding (``generate_answers``: the image prefilled once for
          all its questions; ≤ ``answer_tokens`` tokens),
          the free-form answer mapped to a choice by ``answer_match``; mean over all questions
    gen   accuracy of the JUDGE (GPT-4o's role) on the model's GENERATED images: ``images_per_prompt`` images per
          record prompt (MaskGIT, ``steps``, CFG ``guidance_scale``), decoded by the VQ tokenizer, the same
          questions answered by ``world.judge``; mean over all (image, question)
    gap   und − gen

Also: ``und_by_category`` / ``gen_by_question`` (question-level accuracy per question category, the two sides of
the gap split up), ``gen_by_category`` (GenEval-style: per record category, the fraction of generated images for
which the judge answers every question of the record right; ``geneval`` their mean, GenEval's "overall"),
``caption_agreement`` (mean ``world.caption_agreement`` of the model's greedy caption of the real image vs the true
scene), and sample generations for ``save_grid`` (codes of the first ``num_samples`` records' real and generated
images, their prompts and the model's captions).

Seeded per record: record ``id``'s images come from a generator seeded by sha256(seed, id), so a record's score does
not depend on the batch it is drawn in or on the other records. Greedy text decoding is deterministic.

    hermesflow eval --checkpoint hermesflow_fast/world/base --run-dir runs/eval-base --records 300
    python -m pytest -q tests/world/test_evaluate.py
"""

from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from hermesflow_fast.data.text import DEFAULT_QUESTION, prompt_ids, und_prompt_ids
from hermesflow_fast.model.generate import generate_answers, generate_images, generate_text
from hermesflow_fast.model.tokenizer_vq import image_to_tensor, images_to_uint8
from hermesflow_fast.seeding import hashed_generator
from hermesflow_fast.world.config import EvalSection
from hermesflow_fast.world.judge import JUDGE, Judge
from hermesflow_fast.world.records import WorldRecord
from hermesflow_fast.world.scene import CATEGORIES
from hermesflow_fast.world.scoring import answer_match, caption_agreement

__all__ = ["EvalResult", "encode_records", "eval_generator", "evaluate", "evaluate_seeds", "image_grid", "save_grid",
           "seed_stats"]


@dataclass
class EvalResult:
    und: float
    gen: float
    gap: float  # und − gen
    und_by_category: dict[str, float]  # question category → accuracy of the model's answers on real images
    gen_by_question: dict[str, float]  # question category → accuracy of the judge on generated images
    gen_by_category: dict[str, float]  # record category → fraction of generated images with every question right
    geneval: float  # mean of gen_by_category over the categories present
    caption_agreement: float
    n_records: int
    n_questions: int
    n_images: int
    settings: dict[str, Any]
    samples: dict[str, Any] = field(default_factory=dict)  # prompts, captions, real (S, N), codes (S, M, N)

    def to_dict(self, samples: bool = True) -> dict[str, Any]:
        d = asdict(self)
        if samples:
            s = self.samples
            d["samples"] = {**s, "real": s["real"].tolist(), "codes": s["codes"].tolist()} if s else {}
        else:
            d.pop("samples")
        return d

    def table(self) -> str:
        """A small plain-text table: the three scores, then one line per category."""
        lines = [f"und {self.und:.3f}   gen {self.gen:.3f}   gap {self.gap:+.3f}   caption agreement "
                 f"{self.caption_agreement:.3f}   GenEval-style overall {self.geneval:.3f}",
                 f"({self.n_records} records, {self.n_questions} questions, {self.n_images} generated images; "
                 f"{self.settings['images_per_prompt']} per prompt, {self.settings['steps']} steps, guidance "
                 f"{self.settings['guidance_scale']})",
                 f"{'category':<14}{'und (q)':>9}{'gen (q)':>9}{'GenEval':>9}"]
        cats = [c for c in CATEGORIES if c in {**self.und_by_category, **self.gen_by_category}]
        nan = float("nan")
        for c in cats:
            lines.append(f"{c:<14}{self.und_by_category.get(c, nan):>9.3f}{self.gen_by_question.get(c, nan):>9.3f}"
                         f"{self.gen_by_category.get(c, nan):>9.3f}")
        return "\n".join(lines)


def eval_generator(seed: int, record_id: str, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one record's generated images: seeded by sha256(seed, id)."""
    return hashed_generator("evaluate", seed, record_id, device=device)


def encode_records(wm, records: Sequence[WorldRecord], encode_batch: int = 256) -> Tensor:
    """(R, N) int64: the records' rendered images encoded by the world model's image tokenizer."""
    out = []
    for i in range(0, len(records), encode_batch):
        imgs = torch.stack([image_to_tensor(r.render()) for r in records[i:i + encode_batch]])  # (B, 3, 32, 32)
        out.append(wm.image_tokenizer.encode(imgs.to(wm.image_tokenizer.device)).cpu())
    return torch.cat(out) if out else torch.zeros(0, wm.num_image_tokens, dtype=torch.long)


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def _decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True).strip()


def _settings(settings: EvalSection | None, knobs: dict[str, Any]) -> EvalSection:
    base = settings if settings is not None else EvalSection()
    unknown = sorted(set(knobs) - {f.name for f in fields(EvalSection)})
    if unknown:
        raise TypeError(f"evaluate: unknown setting(s) {unknown}; EvalSection has {[f.name for f in fields(base)]}")
    e = replace(base, **knobs)
    if e.images_per_prompt < 1 or e.steps < 1 or e.batch_size < 1:
        raise ValueError(f"evaluate: images_per_prompt={e.images_per_prompt}, steps={e.steps} and batch_size="
                         f"{e.batch_size} must be ≥ 1")
    return e


def _check_records(records: Sequence[WorldRecord]) -> None:
    if not records:
        raise ValueError("evaluate: no records")
    if any(not r.questions for r in records):
        bad = next(r.id for r in records if not r.questions)
        raise ValueError(f"evaluate: record {bad!r} has no questions; it cannot be scored")


@dataclass
class _Understanding:
    """The model's answers about and captions of the real images: greedy, so the same for every seed."""

    real: Tensor  # (R, N) codes of the real images
    hits: dict[str, list[int]]  # question category → right (1) or wrong (0), per question
    captions: list[str]
    agreements: list[float]


@dataclass
class _Generation:
    hits: dict[str, list[int]]  # question category → the judge right on a generated image, per (image, question)
    geneval: dict[str, list[int]]  # record category → every question right, per generated image
    sample_codes: list[Tensor]  # (M, N) per sampled record


def _understand(wm, records: Sequence[WorldRecord], e: EvalSection, sot: bool) -> _Understanding:
    model, layout, tok = wm.model, wm.layout, wm.text_tokenizer
    real = encode_records(wm, records)  # (R, N)
    cap_prompt = und_prompt_ids(tok, DEFAULT_QUESTION)
    out = _Understanding(real, defaultdict(list), [], [])
    for start in range(0, len(records), e.batch_size):
        batch = records[start:start + e.batch_size]
        codes = real[start:start + len(batch)].to(wm.device)  # (B, N)
        # every question about the real image, greedy; each image prefilled once for all its questions
        prompts = [[und_prompt_ids(tok, q.prompt) for q in r.questions] for r in batch]
        answers = generate_answers(model, layout, codes, prompts, max_new_tokens=e.answer_tokens, sot=sot)
        for r, said in zip(batch, answers):
            for q, ids in zip(r.questions, said):
                out.hits[q.category].append(int(answer_match(_decode(tok, ids), q.choices) == q.answer))
        # caption of the real image, greedy
        caps = generate_text(model, layout, codes, [cap_prompt] * len(batch), max_new_tokens=e.caption_tokens,
                             sot=sot)
        for r, ids in zip(batch, caps):
            text = _decode(tok, ids)
            out.captions.append(text)
            out.agreements.append(caption_agreement(text, r.scene))
    return out


def _generate(wm, records: Sequence[WorldRecord], e: EvalSection, seed: int, judge: Judge,
              num_samples: int) -> _Generation:
    model, layout, tok = wm.model, wm.layout, wm.text_tokenizer
    M, N = e.images_per_prompt, wm.num_image_tokens
    out = _Generation(defaultdict(list), defaultdict(list), [])
    for start in range(0, len(records), e.batch_size):
        batch = records[start:start + e.batch_size]
        gens = [eval_generator(seed, r.id, wm.device) for r in batch]
        made = generate_images(model, layout, [prompt_ids(tok, r.prompt) for r in batch], N, images_per_prompt=M,
                               steps=e.steps, guidance_scale=e.guidance_scale,
                               noise_temperature=e.noise_temperature, compounding_noise=e.compounding_noise,
                               generator=gens)  # (B·M, N), prompt-major
        pixels = wm.image_tokenizer.decode(made.to(wm.image_tokenizer.device)).cpu()  # (B·M, 3, 32, 32)
        for b, r in enumerate(batch):
            for m in range(M):
                said = judge.answers(pixels[b * M + m], r.questions)
                right = [int(a == q.answer) for a, q in zip(said, r.questions)]
                for q, ok in zip(r.questions, right):
                    out.hits[q.category].append(ok)
                out.geneval[r.category].append(int(all(right)))
        if len(out.sample_codes) < num_samples:
            out.sample_codes.extend(made.view(len(batch), M, N).cpu()[: num_samples - len(out.sample_codes)])
    return out


def _result(records: Sequence[WorldRecord], und: _Understanding, gen: _Generation, e: EvalSection, seed: int,
            sot: bool, judge: Judge, N: int) -> EvalResult:
    M = e.images_per_prompt
    und_score = _mean([x for v in und.hits.values() for x in v])
    gen_score = _mean([x for v in gen.hits.values() for x in v])
    by_cat = {c: _mean(gen.geneval[c]) for c in CATEGORIES if gen.geneval[c]}
    S = len(gen.sample_codes)
    samples = {"prompts": [r.prompt for r in records[:S]], "captions": und.captions[:S], "real": und.real[:S].clone(),
               "codes": torch.stack(gen.sample_codes) if S else torch.zeros(0, M, N, dtype=torch.long)}
    return EvalResult(
        und=und_score, gen=gen_score, gap=und_score - gen_score,
        und_by_category={c: _mean(und.hits[c]) for c in CATEGORIES if und.hits[c]},
        gen_by_question={c: _mean(gen.hits[c]) for c in CATEGORIES if gen.hits[c]},
        gen_by_category=by_cat, geneval=_mean(list(by_cat.values())),
        caption_agreement=_mean(und.agreements), n_records=len(records),
        n_questions=sum(len(v) for v in und.hits.values()), n_images=len(records) * M,
        settings={"images_per_prompt": M, "steps": e.steps, "guidance_scale": e.guidance_scale,
                  "noise_temperature": e.noise_temperature, "compounding_noise": e.compounding_noise, "seed": seed,
                  "answer_tokens": e.answer_tokens,
                  "caption_tokens": e.caption_tokens, "sot": sot, "judge": type(judge).__name__},
        samples=samples)


@torch.no_grad()
def evaluate_seeds(wm, records: Sequence[WorldRecord], settings: EvalSection | None = None, *, seed: int,
                   sot: bool = True, num_samples: int = 16, judge: Judge = JUDGE,
                   **knobs: Any) -> list[EvalResult]:
    """Table 4 on ``records`` for a ``ModelBundle`` once per evaluation seed ``seed, seed + 1, …`` (``seeds`` of
    the settings): the understanding side (greedy) is computed once and shared, the generation side drawn per seed.
    ``settings``: an ``EvalSection`` (default: its defaults); ``knobs``: any of its fields, overriding it.
    ``batch_size`` records per generation call (their questions ride together in the answering calls); ``sot``
    puts <|sot|> before the prompt as Show-o's inference (and the curation) does."""
    e = _settings(settings, knobs)
    _check_records(records)
    was_training = wm.model.training
    wm.model.eval()
    try:
        und = _understand(wm, records, e, sot)
        return [_result(records, und, _generate(wm, records, e, seed + k, judge, num_samples), e, seed + k, sot,
                        judge, wm.num_image_tokens) for k in range(e.seeds)]
    finally:
        wm.model.train(was_training)


def evaluate(wm, records: Sequence[WorldRecord], settings: EvalSection | None = None, *, seed: int,
             sot: bool = True, num_samples: int = 16, judge: Judge = JUDGE, **knobs: Any) -> EvalResult:
    """Table 4 on ``records`` for one seed (``evaluate_seeds``' first; ``settings.seeds`` is not read)."""
    return evaluate_seeds(wm, records, settings, seed=seed, sot=sot, num_samples=num_samples, judge=judge,
                          **{**knobs, "seeds": 1})[0]


def seed_stats(runs: Sequence[EvalResult]) -> dict:
    """und / gen / gap (and per-category gen, caption agreement) as the mean over evaluation seeds (gap = und − gen
    of the means); with more than one seed also each score's standard deviation (``*_std``, ddof 1) and its values
    per seed (``*_seeds``)."""
    mean = statistics.fmean
    out: dict = {}
    for key in ("und", "gen", "gap"):
        xs = [float(getattr(r, key)) for r in runs]
        out[key] = mean(xs) if key != "gap" else out["und"] - out["gen"]  # the mean gap, exactly und − gen
        if len(runs) > 1:
            out[f"{key}_std"] = statistics.stdev(xs)
            out[f"{key}_seeds"] = xs
    out["gen_by_category"] = {c: mean([r.gen_by_category[c] for r in runs]) for c in runs[0].gen_by_category}
    out["caption_agreement"] = mean([r.caption_agreement for r in runs])
    return out


def image_grid(images: Tensor, ncol: int, scale: int = 4, pad: int = 2,
               labels: Sequence[str] | None = None) -> Image.Image:
    """(B, 3, H, W) in [−1, 1] → one RGB image: ``ncol`` columns, each image upscaled ×``scale`` (nearest), on grey;
    ``labels`` (one per row of the grid) are written under each row."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"image_grid: images must be (B, 3, H, W), got {tuple(images.shape)}")
    if ncol < 1 or scale < 1:
        raise ValueError(f"image_grid: ncol={ncol} and scale={scale} must be ≥ 1")
    B, _, H, W = images.shape
    nrow = max(1, math.ceil(B / ncol))
    text_h = 12 if labels else 0
    ch, cw = H * scale + pad, W * scale + pad
    canvas = Image.new("RGB", (ncol * cw + pad, nrow * (ch + text_h) + pad), (64, 64, 64))
    arr = images_to_uint8(images, "image_grid").numpy()  # (B, H, W, 3)
    draw = ImageDraw.Draw(canvas)
    for i in range(B):
        r, c = divmod(i, ncol)
        tile = Image.fromarray(arr[i]).resize((W * scale, H * scale), Image.NEAREST)
        canvas.paste(tile, (pad + c * cw, pad + r * (ch + text_h)))
    for r, text in enumerate(labels or []):
        if r < nrow:
            draw.text((pad, pad + r * (ch + text_h) + H * scale + 1), str(text)[: 6 * ncol * scale], fill=(230,) * 3)
    return canvas


def save_grid(wm, result: EvalResult, path: str | os.PathLike, scale: int = 4) -> Path:
    """A PNG of the samples: one row per sample record, the real image first, then its generated images, the
    prompt written under the row. Returns the path."""
    s = result.samples
    if not s or len(s["prompts"]) == 0:
        raise ValueError("save_grid: the result holds no samples (evaluate(..., num_samples=0)?)")
    real, codes = s["real"], s["codes"]  # (S, N), (S, M, N)
    S, M, N = codes.shape
    tiles = torch.cat([real.unsqueeze(1), codes], 1).reshape(S * (M + 1), N)
    images = wm.image_tokenizer.decode(tiles.to(wm.image_tokenizer.device)).cpu()
    grid = image_grid(images, ncol=M + 1, scale=scale, labels=[f"{p}" for p in s["prompts"]])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
