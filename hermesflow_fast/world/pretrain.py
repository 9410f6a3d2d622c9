"""Pretraining the shapes world's base model from scratch: a tiny Show-o-architecture transformer learns to draw
(t2i), caption (mmu) and answer questions (VQA) on the world, on CPU, reproducibly; self-play then starts from it.

    hermesflow pretrain --world shapes [--out hermesflow_fast/world/base] [--records 4000] [--steps 1500] [--seed 0]

Data. ``records`` train records (``make_records(n, seed, "train")``), rendered at 32×32: a 4×4 grid of 8-px cells,
at most one object per cell (world/scene.py). The image tokenizer is a ``PatchVQTokenizer`` with 8-px patches (one
token per cell, N = 16) and 16 codes, k-means on the first ``vq_images`` train images: the world draws 13 distinct
cells (12 glyphs and the empty cell), so the codes are lossless and the judge reads every reconstructed render right.
Every image is encoded once, before training. The word tokenizer is ``build_word_tokenizer(world_words())`` with
Show-o's [PAD] and specials added (``Vocabulary.from_tokenizer``).

HermesFlow's premise, built in (world/noise.py): real text-to-image models are pretrained on web captions that often
miss their image, while their understanding learns from cleaner labels, so they understand better than they draw.
Here a seeded ``caption_noise`` fraction of the t2i rows is conditioned on a *near miss* of the image's caption (one
colour, shape, count or relation wrong, as alt-text is); the caption rows always hold the true caption. A
``vqa_perturb`` fraction of the understanding images are renders that miss their record (a perturbed scene) and are
asked the record's questions, answered as the judge reads the perturbed render, and ``probe_questions`` adds a count
and a where-is question to every understanding image: so the base can answer questions about imperfect images — its
own generations — as the judge would, which is what self-VQA needs.

Each optimizer step mixes Show-o's three losses in one batch, each a mean over its scored tokens:

    t2i   B_t rows of [pad…][t2i][bos] prompt [eos] | [soi] x [eoi]: t ~ U(0,1), r = cos(πt/2), k = max(1, round(N·r))
          slots drawn uniformly are set to [MASK]; CE at those slots (no shift, the model predicts the slot's own
          code); the prompt is dropped to [t2i][bos][eos] with probability 0.1 so classifier-free guidance has an
          unconditional model to push away from
    cap   [mmu][soi] x [eoi] "USER: Give a detailed caption for this image. ASSISTANT:" caption [eos]
    vqa   [mmu][soi] x [eoi] "USER: {question.prompt} ASSISTANT:" answer [eos]      for every question of x
          B_u images per step, each with its caption and all its questions; next-token CE over answer + eos (as
          Layout's "answer" target). They ride packed: one row per image holds the prefix [mmu][soi] x [eoi] once
          and one branch per text (the masks' branch tags: a branch sees the prefix and itself; its positions
          restart after the prefix), exactly the unpacked rows (tests/world/test_pretrain.py checks the
          log-probs) with the image prefix (19 tokens) stored once instead of once per text. Half of the
          branches, drawn at random, put <|sot|> before the prompt (Show-o's inference form, how the curation
          decodes) and half do not (HermesFlow's training form, how Pair-DPO scores): the base answers under both

    loss = t2i + cap + vqa;  log-probs by ``ops.linear_logprobs`` on the target rows only

AdamW (no decay on biases, norms, embeddings; ``train.optim``), linear warm-up then cosine to 10% of the peak lr,
gradient norm clipped at 1. All randomness (initialisation, batches, masks, dropout, sot) comes from ``seed``; the
same seed gives bit-identical weights on the same machine and thread count (checked by tests/world/
test_pretrain.py). At the end the base is evaluated with the Table 4 protocol (``world.evaluate``) on
``eval_records`` held-out records and everything is written to ``out`` (the folder ``world.base.load_base``
reads, plus ``pretrain.json``: the command, config, wall time, loss curve, final losses and the eval numbers).

Shipped base (``hermesflow_fast/world/base/``): ``hermesflow pretrain --world shapes --records 4000 --steps 1500
--seed 0 --threads 1`` (d 128, 4 layers, 4 heads, MLP 512: 813,137 parameters, 3.3 MB; 1500 steps of 32 t2i rows
+ 16 packed images). Measured on the 2-core CPU box with one thread: 1493 s in all (prepare 3.2, train 1478.7,
held-out eval 8.7). Two threads beside another busy process are ~10× slower (OpenMP threads spinning); there use
``--threads 1``. Its pretrain.json holds the command, config, loss curve and the end-of-training evaluation (300
held-out records, 12 MaskGIT steps, guidance 3): und 0.980, gen 0.640. The self-play recipe evaluates it with
its own sampler settings (configs/selfplay-shapes.yaml; docs/selfplay.md).

    python -m pytest -q tests/world/test_pretrain.py
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hermesflow_fast.data.text import DEFAULT_QUESTION, build_word_tokenizer, caption_ids, prompt_ids, und_prompt_ids
from hermesflow_fast.model.bundle import ModelBundle
from hermesflow_fast.model.layout import IGNORE_INDEX, Layout, Sequences, Target, Vocabulary
from hermesflow_fast.model.masks import OmniMask
from hermesflow_fast.model.tokenizer_vq import PatchVQTokenizer, image_to_tensor
from hermesflow_fast.model.transformer import UnifiedTransformer
from hermesflow_fast.ops import linear_logprobs
from hermesflow_fast.train.optim import param_groups, warmup_cosine
from hermesflow_fast.world.config import WORLDS, PretrainConfig
from hermesflow_fast.world.judge import JUDGE
from hermesflow_fast.world.noise import noisy_prompts, perturb, probe_questions
from hermesflow_fast.world.questions import question_prompt
from hermesflow_fast.world.records import WorldRecord, make_records
from hermesflow_fast.world.scene import render_objects
from hermesflow_fast.world.shipped import BASE_DIR, WORLD_LAYOUT
from hermesflow_fast.world.vocabulary import world_words

__all__ = ["WORLDS", "PretrainConfig", "WorldData", "build_batch", "mask_slots", "packed_mmu", "prepare_world",
           "pretrain", "pretrain_losses", "render_batch", "target_logprobs", "world_data"]

@dataclass
class WorldData:
    """Everything training needs, tokenized once: codes (R, N) of the train images, the prompt / caption ids per
    record, and per record its questions' prompt and answer ids."""

    records: list[WorldRecord]
    codes: Tensor  # (R, N) int64
    prompts: list[list[int]]  # t2i prompt ids per record: its caption, or a near miss of it (caption_noise)
    captions: list[list[int]]  # caption ids per record (the answer of the caption rows): always the true one
    caption_prompt: list[int]  # und_prompt_ids(DEFAULT_QUESTION)
    vqa: list[list[tuple[list[int], list[int]]]]  # per record: (question prompt ids, answer ids) per question
    noisy: list[bool]  # per record: its t2i prompt is a near miss
    tokenize: Callable[[Callable[[Any, str], list[int]], str], list[int]]  # (ids fn, text) → ids, cached


def render_batch(records: Sequence[WorldRecord]) -> Tensor:
    """(B, 3, 32, 32) float in [−1, 1]: the records' images as the image tokenizer takes them."""
    return torch.stack([image_to_tensor(r.render()) for r in records])


def prepare_world(cfg: PretrainConfig, tokenizer_dir: str | os.PathLike) -> tuple[ModelBundle, WorldData]:
    """Train records, the two tokenizers, the vocabulary, layout and a freshly initialised model (seeded), and
    the tokenized data. ``tokenizer_dir`` is where the word tokenizer is first written (a scratch folder)."""
    records = make_records(cfg.records, cfg.seed, "train")
    images = render_batch(records)  # (R, 3, 32, 32)
    vq = PatchVQTokenizer.fit(images[: cfg.vq_images], cfg.num_codes, seed=cfg.seed, iters=cfg.vq_iters,
                              patch_size=cfg.patch_size)
    codes = vq.encode(images)  # (R, N)
    tok = build_word_tokenizer(world_words(), tokenizer_dir)
    vocab = Vocabulary.from_tokenizer(tok, vq.num_codes)
    layout = Layout(vocab, **WORLD_LAYOUT)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = UnifiedTransformer(cfg.model_config(vocab.vocab_size))

    t2i_prompts, noisy = noisy_prompts([r.scene for r in records], cfg.caption_noise, cfg.seed)
    data = world_data(tok, records, codes, t2i_prompts, noisy)
    return ModelBundle(model, vocab, layout, tok, vq), data


def world_data(tok: Any, records: Sequence[WorldRecord], codes: Tensor, t2i_prompts: Sequence[str] | None = None,
               noisy: Sequence[bool] | None = None) -> WorldData:
    """The records tokenized once (every distinct text once): ``t2i_prompts`` (default: the true captions) are what
    the t2i rows are conditioned on, ``noisy`` which of them are near misses."""
    cache: dict[str, list[int]] = {}

    def ids(fn: Callable[[Any, str], list[int]], text: str) -> list[int]:
        key = f"{fn.__name__}\x1f{text}"
        if key not in cache:
            cache[key] = fn(tok, text)
        return cache[key]

    prompts = [r.prompt for r in records] if t2i_prompts is None else list(t2i_prompts)
    vqa = [[(ids(und_prompt_ids, q.prompt), ids(caption_ids, q.answer)) for q in r.questions] for r in records]
    return WorldData(list(records), codes, [ids(prompt_ids, p) for p in prompts],
                     [ids(caption_ids, r.caption) for r in records], ids(und_prompt_ids, DEFAULT_QUESTION), vqa,
                     list(noisy) if noisy is not None else [False] * len(records), ids)


def mask_slots(batch: int, num_tokens: int, generator: torch.Generator) -> Tensor:
    """Show-o's training mask (B, N) bool: per row t ~ U(0,1), r = cos(πt/2), k = max(1, round(N·r)) slots drawn
    uniformly without replacement."""
    t = torch.rand(batch, generator=generator, dtype=torch.float64)
    k = torch.round(num_tokens * torch.cos(math.pi / 2 * t)).clamp_(min=1).long()  # (B,)
    rank = torch.rand(batch, num_tokens, generator=generator).argsort(1).argsort(1)  # (B, N) a random permutation
    return rank < k.unsqueeze(1)


def packed_mmu(vocab: Vocabulary, codes: Tensor, branches: Sequence[Sequence[tuple[list[int], list[int], str]]]
               ) -> Sequences:
    """Understanding rows with a shared prefix: row b is ``[mmu][soi] image_b [eoi]`` once, then one branch per
    (prompt, answer, target name) of ``branches[b]``: ``prompt answer [eos]``, branch k = 1, 2, …, each seeing the
    prefix and itself only, its positions restarting after the prefix, so every branch is exactly the unpacked
    ``Layout.mmu`` row ``[mmu][soi] image [eoi] prompt answer [eos]`` (the prefix is computed once, not once per
    question). Targets by name (next-token rows over answer + eos, as Layout's "answer")."""
    names = sorted({name for row in branches for _, _, name in row})
    B = codes.shape[0]
    if len(branches) != B:
        raise ValueError(f"packed_mmu: {B} images but {len(branches)} branch lists")
    img = vocab.image_ids(codes)  # (B, N)
    rows: list[tuple[list[int], list[int], list[int], list[int]]] = []  # ids, positions, block, branch
    tgts: dict[str, list[tuple[list[int], list[int]]]] = {n: [] for n in names}
    for b in range(B):
        ids = [vocab.mmu, vocab.soi, *img[b].tolist(), vocab.eoi]
        P = len(ids)
        pos, block, branch = list(range(P)), [0] * P, [0] * P
        per = {n: ([], []) for n in names}
        for k, (prompt, answer, name) in enumerate(branches[b], 1):
            vocab.check_text(prompt, f"packed_mmu prompt {b}.{k}")
            vocab.check_text(answer, f"packed_mmu answer {b}.{k}")
            text = [*prompt, *answer, vocab.eos]
            first = len(ids) + len(prompt)  # the first answer token, predicted by the row before it
            per[name][0].extend(range(first - 1, first + len(answer)))
            per[name][1].extend(text[len(prompt):])
            ids += text
            pos += range(P, P + len(text))
            block += [-1] * len(text)
            branch += [k] * len(text)
        rows.append((ids, pos, block, branch))
        for n in names:
            tgts[n].append(per[n])
    T = max(len(r[0]) for r in rows)
    input_ids = torch.full((B, T), vocab.pad, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)
    blocks = torch.full((B, T), -1, dtype=torch.int32)
    branch_ids = torch.zeros(B, T, dtype=torch.int32)
    for b, (ids, pos, block, branch) in enumerate(rows):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids)
        positions[b, :n] = torch.tensor(pos)
        # padding keeps position 0: it is never attended and never scored
        valid[b, :n] = True
        blocks[b, :n] = torch.tensor(block, dtype=torch.int32)
        branch_ids[b, :n] = torch.tensor(branch, dtype=torch.int32)
    targets = {}
    for n in names:
        L = max(len(r) for r, _ in tgts[n])
        tr = torch.zeros(B, L, dtype=torch.long)
        tl = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        for b, (r, y) in enumerate(tgts[n]):
            tr[b, :len(r)] = torch.tensor(r, dtype=torch.long)
            tl[b, :len(y)] = torch.tensor(y, dtype=torch.long)
        targets[n] = Target(tr, tl)
    return Sequences(input_ids, positions, OmniMask(valid, blocks, branch_ids), targets)


def target_logprobs(model: UnifiedTransformer, seqs: Sequences) -> dict[str, tuple[Tensor, Tensor]]:
    """Per target name: log p per token (B, L) and its validity (B, L), from ONE forward of ``seqs``."""
    h = model(seqs.input_ids, seqs.mask, seqs.position_ids)  # (B, T, d)
    out = {}
    for name, tgt in seqs.targets.items():
        hs = h.gather(1, tgt.rows.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # (B, L, d)
        lp = linear_logprobs(hs, model.lm_head.weight, tgt.labels, model.lm_head.bias)  # (B, L)
        out[name] = (lp, tgt.labels != IGNORE_INDEX)
    return out


def build_batch(wm: ModelBundle, data: WorldData, cfg: PretrainConfig, g: torch.Generator) -> dict[str, Any]:
    """One step's rows: t2i Sequences, and packed understanding Sequences (targets "caption" and "vqa")."""
    v, N = wm.vocab, data.codes.shape[1]
    R = len(data.records)
    ti = torch.randint(R, (cfg.batch_t2i,), generator=g)
    drop = torch.rand(cfg.batch_t2i, generator=g) < cfg.cond_dropout
    texts = [[] if d else data.prompts[i] for i, d in zip(ti.tolist(), drop.tolist())]
    masked = mask_slots(cfg.batch_t2i, N, g)
    t2i = wm.layout.t2i(texts, data.codes[ti], masked)

    ui = torch.randint(R, (cfg.batch_und,), generator=g).tolist()
    perturbed = (torch.rand(cfg.batch_und, generator=g) < cfg.vqa_perturb).tolist()
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=g)))
    recs = [data.records[i] for i in ui]
    objects = [perturb(r.scene, rng) if p else list(r.scene.objects) for r, p in zip(recs, perturbed)]
    codes = data.codes[ui].clone()  # (B_u, N)
    moved = [k for k, p in enumerate(perturbed) if p]
    images = {k: render_objects(objects[k]) for k in range(len(ui)) if perturbed[k] or cfg.probe_questions}
    if moved:  # images that miss their caption
        codes[moved] = wm.image_tokenizer.encode(torch.stack([image_to_tensor(images[k]) for k in moved]))
    branches = []
    for k, (i, r) in enumerate(zip(ui, recs)):
        probes = probe_questions(objects[k], rng) if cfg.probe_questions else []
        asked = ([q.text for q in r.questions] if perturbed[k] else []) + [t for t, _ in probes]
        read = JUDGE.answers(images[k], asked) if asked else []  # what the judge reads off this image
        if perturbed[k]:  # no caption row: the record's caption does not describe this image
            items = [(p, data.tokenize(caption_ids, a), "vqa") for (p, _), a in zip(data.vqa[i], read)]
        else:
            items = [(data.caption_prompt, data.captions[i], "caption")] + [(p, a, "vqa") for p, a in data.vqa[i]]
        for (text, choices), a in zip(probes, read[len(asked) - len(probes):]):
            items.append((data.tokenize(und_prompt_ids, question_prompt(text, choices)),
                          data.tokenize(caption_ids, a), "vqa"))
        sot = (torch.rand(len(items), generator=g) < cfg.sot_prob).tolist()
        branches.append([(([v.bos] if s else []) + p, a, name) for (p, a, name), s in zip(items, sot)])
    return {"t2i": t2i, "und": packed_mmu(v, codes, branches)}


def pretrain_losses(model: UnifiedTransformer, batch: dict[str, Any]) -> dict[str, Tensor]:
    """Mean CE per task: "t2i" over masked slots, "caption" and "vqa" over answer tokens + eos."""
    res = {**target_logprobs(model, batch["t2i"]), **target_logprobs(model, batch["und"])}
    out = {"t2i" if name == "image" else name: -(lp.sum() / ok.sum().clamp_min(1)) for name, (lp, ok) in res.items()}
    zero = next(iter(out.values())) * 0.0
    return {name: out.get(name, zero) for name in ("t2i", "caption", "vqa")}  # a step may hold no caption row


def _command(cfg: PretrainConfig, out: Path) -> str:
    try:
        out = out.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    return (f"hermesflow pretrain --world {cfg.world} --out {out} --records {cfg.records} --steps {cfg.steps} "
            f"--seed {cfg.seed} --threads {torch.get_num_threads()}")


def pretrain(cfg: PretrainConfig, out: str | os.PathLike | None = BASE_DIR, log: Callable[[str], None] | None = print,
             evaluate_records: int | None = None) -> tuple[ModelBundle, dict[str, Any]]:
    """Train the base (see the module docstring); save it to ``out`` unless None. Returns the model (eval mode)
    and the summary written as ``pretrain.json``."""
    say = log or (lambda _: None)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        wm, data = prepare_world(cfg, scratch)
    t_prep = time.perf_counter() - t0
    model = wm.model
    say(f"pretrain: {len(data.records)} records, {sum(map(len, data.vqa))} questions, VQ "
        f"{wm.image_tokenizer.num_codes} codes (fit mse {wm.image_tokenizer.fit_history[-1]:.5f}), vocab "
        f"{wm.vocab.vocab_size}, {sum(p.numel() for p in model.parameters()):,} params; prep {t_prep:.1f} s")

    groups = param_groups(model, cfg.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8, foreach=True)
    sched = warmup_cosine(opt, min(cfg.warmup_steps, cfg.steps // 10), cfg.steps, cfg.min_lr_ratio)
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    curve: list[dict[str, float]] = []
    window: dict[str, list[float]] = {}
    t1 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        batch = build_batch(wm, data, cfg, g)
        losses = pretrain_losses(model, batch)
        loss = sum(w * losses[k] for w, k in zip(cfg.coeffs, ("t2i", "caption", "vqa")))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretrain: loss is {float(loss)} at step {step} (losses "
                                     f"{ {k: float(v) for k, v in losses.items()} }); lower --lr")
        opt.step()
        sched.step()
        for k, val in {**losses, "loss": loss, "grad_norm": gnorm}.items():
            window.setdefault(k, []).append(float(val.detach()))
        if step % cfg.log_every == 0 or step == cfg.steps:
            row = {"step": step, "lr": opt.param_groups[0]["lr"], "time_s": round(time.perf_counter() - t1, 1),
                   **{k: round(sum(v) / len(v), 4) for k, v in window.items()}}
            curve.append(row)
            window = {}
            say("  ".join(f"{k} {v}" for k, v in row.items()))
    t_train = time.perf_counter() - t1
    model.eval().requires_grad_(False)

    summary: dict[str, Any] = {
        "command": _command(cfg, Path(out) if out is not None else Path("-")),
        "config": asdict(cfg),
        "params": sum(p.numel() for p in model.parameters()),
        "model": {"hidden_size": cfg.hidden_size, "layers": cfg.num_layers, "heads": cfg.num_heads,
                  "intermediate_size": cfg.intermediate_size, "vocab_size": wm.vocab.vocab_size},
        "image_tokenizer": {"type": "patch_vq", "patch_size": cfg.patch_size, "num_codes": cfg.num_codes,
                            "grid": list(wm.image_tokenizer.grid), "fit_mse": wm.image_tokenizer.fit_history[-1]},
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()},
        "wall_time_s": {"prepare": round(t_prep, 1), "train": round(t_train, 1)},
        "final_losses": {k: v for k, v in curve[-1].items() if k in ("t2i", "caption", "vqa", "loss")},
        "curve": curve,
    }
    n_eval = cfg.eval_records if evaluate_records is None else evaluate_records
    if n_eval > 0:
        from hermesflow_fast.world.evaluate import evaluate

        t2 = time.perf_counter()
        held = make_records(n_eval, cfg.seed, "heldout")
        res = evaluate(wm, held, cfg.eval, seed=cfg.seed)
        summary["wall_time_s"]["eval"] = round(time.perf_counter() - t2, 1)
        summary["eval"] = res.to_dict(samples=False)
        say(res.table())
    summary["wall_time_s"]["total"] = round(time.perf_counter() - t0, 1)
    if out is not None:
        out = Path(out)
        wm.save(out)
        (out / "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n")
        say(f"pretrain: saved to {out} ({summary['wall_time_s']})")
    return wm, summary
