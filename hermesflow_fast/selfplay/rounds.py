"""Self-play rounds: for r = 1..R, curate with M_{r−1}, train M_r from M_{r−1} (policy init = reference = M_{r−1}),
evaluate on held-out records.

    run_dir/round-0/eval.json                  the base model, measured the same way
    run_dir/round-r/und_candidates.jsonl       K captions per record         (journal: resumable per record)
                    und_scores.jsonl           their scores
                    gen_candidates.jsonl       M token grids per prompt
                    images/<id>/<k>.png        those grids decoded (only with curation.save_images=true)
                    gen_scores.jsonl           self-VQA accuracy per grid
                    pairs.jsonl, stats.json    the round's pairs (Eq. 10 from round 2) and why others were dropped
                    train/                     the trainer's run dir (metrics.jsonl, checkpoints)
                    model/                     M_r (a WorldModel folder)
                    eval.json, samples.png     held-out und / gen / gap, per category; sample generations;
                                               eval.json's "diagnostics": the round's candidates read by the judge
                                               and by self-VQA, and its pairs (selfplay/diagnose.py)
    run_dir/summary.json, report.md, gap.png   every round's scores

Each stage leaves ``<stage>.done`` when complete; ``resume`` continues at the first unfinished stage of the first
unfinished round. Before anything is written, a resume compares the requested config with the run's config.yaml
(``check_run_dir``, train/resume.py's rules): a change to curation, data, the world, the model or the training
math is refused, naming each key with old → new (a journal never mixes records of two settings); logging,
checkpointing, execution settings and the training length change only with ``allow_config_change``. With torchrun
(``--nproc N``), each rank curates a disjoint shard of the records into its own journal, merged by id; training runs
DDP over the same ranks.

Records come from one of two sources, chosen by ``data.records``:

    unset (default)   the shapes world: ``world.train_records`` rendered records, caption scorer = exact attribute
                      agreement, answer matcher = the world's exact match; held-out world records are evaluated by
                      the world's judge every round
    a records file    real data (selfplay/sources.py): images encoded once, TIFA questions joined by id, caption
                      scorer = ``EmbeddingCaptionScorer`` and answer matcher = ``EmbeddingAnswerMatcher`` over the
                      local text embedder ``data.scorer_model``. The held-out evaluation needs the world's judge, so
                      it is SKIPPED for real data: the eval stage still runs (it loads M_r for the next round and
                      leaves eval.done), logs that it was skipped and writes eval.json with null und / gen / gap and
                      a "skipped" reason; the report shows n/a. Evaluate real checkpoints with an external judge.

Every rank reads and encodes all records (training needs every pair's image codes); curation is sharded the same
way for both sources. The held-out evaluation runs on the main rank alone; the others wait for its eval.json.

    hermesflow selfplay --config configs/selfplay-shapes.yaml --run-dir runs/sp --rounds 2
    hermesflow selfplay --config configs/selfplay-real.yaml --run-dir runs/real data.records=… data.questions=… \
                        data.scorer_model=…
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from hermesflow_fast.data.batching import TokenizedPair
from hermesflow_fast.data.text import caption_ids, prompt_ids, und_prompt_ids
from hermesflow_fast.selfplay.config import SelfPlayConfig, check_data
from hermesflow_fast.selfplay.journal import Journal, merge_shards
from hermesflow_fast.selfplay.stages import (
    CurationRecord,
    CurationSettings,
    build_pairs,
    gen_candidates,
    gen_scores,
    und_candidates,
    und_scores,
)
from hermesflow_fast.train.config import TrainConfig, config_to_dict
from hermesflow_fast.train.dataset import TrainData
from hermesflow_fast.train.distributed import DistInfo, barrier, init_distributed
from hermesflow_fast.train.resume import (
    CONFIG_FILE,
    ConfigChange,
    ResumeError,
    changes_header,
    config_changes,
    describe,
    judge_changes,
    read_recorded_config,
)

__all__ = ["check_run_dir", "run_selfplay", "world_curation_records"]

STAGES = ("und_candidates", "und_scores", "gen_candidates", "gen_scores", "pairs", "train", "eval")
EVAL_SKIPPED = "real data (data.records): the held-out evaluation needs the shapes world's judge"


def world_curation_records(wm, records) -> list[CurationRecord]:
    """World records → curation records: the rendered image encoded once by the world's VQ tokenizer."""
    from hermesflow_fast.world import render

    imgs = torch.stack([torch.from_numpy(render(r.scene)).permute(2, 0, 1).float() / 127.5 - 1 for r in records])
    with torch.no_grad():
        codes = wm.image_tokenizer.encode(imgs.to(wm.image_tokenizer.device)).cpu()
    return [CurationRecord(r.id, r.prompt, c, list(r.questions), r.scene) for r, c in zip(records, codes)]


def _settings(cfg: SelfPlayConfig) -> CurationSettings:
    c = cfg.curation
    return CurationSettings(caption_grid=tuple((int(k), float(t)) for k, t in c.caption_grid),
                            images_per_prompt=c.images_per_prompt, steps=c.steps, guidance_scale=c.guidance_scale,
                            noise_temperature=c.noise_temperature, vqa_threshold=c.vqa_threshold,
                            caption_tokens=c.caption_tokens, answer_tokens=c.answer_tokens,
                            batch_size=c.batch_size, seed=cfg.run.seed)


def _tokenized_pairs(wm, records: list[CurationRecord], pairs_file: Path) -> list[TokenizedPair]:
    tok, lay = wm.text_tokenizer, wm.layout
    by_id = {r.id: r for r in records}
    q = und_prompt_ids(tok)
    cap_budget = lay.mmu_text_len - len(q) - 1
    out = []
    for line in pairs_file.read_text().splitlines():
        p = json.loads(line)
        r = by_id[p["id"]]
        und, gen = p.get("und"), p.get("gen")
        out.append(TokenizedPair(
            id=r.id, prompt_ids=prompt_ids(tok, r.prompt)[: lay.t2i_text_len - 3], und_prompt_ids=q,
            image_codes=r.image_codes if und else None,
            caption_chosen_ids=caption_ids(tok, und["chosen"])[:cap_budget] if und else None,
            caption_rejected_ids=caption_ids(tok, und["rejected"])[:cap_budget] if und else None,
            image_chosen_codes=torch.tensor(gen["chosen"]) if gen else None,
            image_rejected_codes=torch.tensor(gen["rejected"]) if gen else None))
    return out


def _train_config(cfg: SelfPlayConfig, init_from: Path, wm) -> TrainConfig:
    t = TrainConfig()
    t.run = cfg.run
    t.train, t.checkpoint, t.log, t.dist = cfg.train, cfg.checkpoint, cfg.log, cfg.dist
    t.model.init_from = str(init_from)
    t.model.compile = False
    t.data.t2i_text_len, t.data.text_budget = wm.layout.t2i_text_len, wm.layout.mmu_text_len
    return t


def _done(rd: Path, stage: str) -> bool:
    return (rd / f"{stage}.done").is_file()


def _done_everywhere(rd: Path, stage: str) -> bool:
    """``_done`` read by every rank before any rank can go on to mark the stage. Every stage check goes through it:
    where the main rank alone does a stage's work (the pairs, the evaluation), a fast main rank would otherwise write
    ``.done`` before a slow rank looks, and the slow rank would skip the stage and the barrier of its ``_mark`` while
    the main rank waits in it (the next barrier then pairs with the wrong one: a hang)."""
    done = _done(rd, stage)
    barrier()
    return done


def _mark(rd: Path, stage: str, info: DistInfo) -> None:
    if info.is_main:
        (rd / f"{stage}.done").write_text("")
    barrier()


def _diagnostics(rd: Path, wm, cfg: SelfPlayConfig) -> dict:
    """The round's diagnostics (selfplay/diagnose.py) for its eval.json; a round whose files cannot be read says why
    instead of failing the run."""
    from hermesflow_fast.errors import UserError
    from hermesflow_fast.selfplay.diagnose import RoundSource, diagnose_round

    if cfg.data.records is None:
        src = RoundSource(True, cfg.world.seed, "world.seed")
    else:
        src = RoundSource(False, real_reason=f"real data (data.records={cfg.data.records})")
    try:
        return diagnose_round(rd, wm.image_tokenizer, source=src, batch_size=cfg.eval.batch_size * 8)
    except UserError as exc:
        return {"unavailable": [str(exc)]}


def _evaluate_into(wm, heldout, cfg: SelfPlayConfig, rd: Path, info: DistInfo, diagnose: bool = False) -> dict:
    from hermesflow_fast.selfplay.evaluate import evaluate, save_grid

    if _done_everywhere(rd, "eval"):
        return json.loads((rd / "eval.json").read_text())
    if info.is_main:  # one evaluation; the other ranks wait in _mark's barrier and read its eval.json
        e = cfg.eval
        runs = [evaluate(wm, heldout, images_per_prompt=e.images_per_prompt, steps=e.steps,
                         guidance_scale=e.guidance_scale, noise_temperature=e.noise_temperature,
                         seed=cfg.run.seed + k, batch_size=e.batch_size) for k in range(e.seeds)]
        res = runs[0]
        out = _seed_stats(runs)
        out.update(records=len(heldout), seeds=[cfg.run.seed + k for k in range(e.seeds)])
        if diagnose:
            out["diagnostics"] = _diagnostics(rd, wm, cfg)
        rd.mkdir(parents=True, exist_ok=True)
        (rd / "eval.json").write_text(json.dumps(out, indent=1) + "\n")
        save_grid(wm, res, rd / "samples.png")
    _mark(rd, "eval", info)
    return out if info.is_main else json.loads((rd / "eval.json").read_text())


def _seed_stats(runs: list) -> dict:
    """und / gen / gap (and per-category gen, caption agreement) as the mean over evaluation seeds; with more than
    one seed also each score's standard deviation (``*_std``, ddof 1) and its values per seed (``*_seeds``)."""
    mean = statistics.fmean
    out: dict = {}
    for key in ("und", "gen", "gap"):
        xs = [float(getattr(r, key)) for r in runs]
        out[key] = mean(xs)
        if len(runs) > 1:
            out[f"{key}_std"] = statistics.stdev(xs)
            out[f"{key}_seeds"] = xs
    out["gen_by_category"] = {c: mean([r.gen_by_category[c] for r in runs]) for c in runs[0].gen_by_category}
    out["caption_agreement"] = mean([r.caption_agreement for r in runs])
    return out


def _skip_eval_into(rd: Path, info: DistInfo, diagnostics: Callable[[], dict] | None = None) -> dict:
    """Real data: no judge; eval.json holds null scores and the reason (the stage is still marked done), and
    the diagnostics self-VQA gives alone."""
    if _done_everywhere(rd, "eval"):
        return json.loads((rd / "eval.json").read_text())
    out = {"und": None, "gen": None, "gap": None, "records": 0, "skipped": EVAL_SKIPPED}
    if info.is_main:
        if diagnostics is not None:
            out["diagnostics"] = diagnostics()
        rd.mkdir(parents=True, exist_ok=True)
        (rd / "eval.json").write_text(json.dumps(out, indent=1) + "\n")
    _mark(rd, "eval", info)
    return out


def _scores(res: dict) -> str:
    if res.get("und") is None:
        return "held-out evaluation skipped (real data; eval.json has null scores)"
    from hermesflow_fast.selfplay.report import format_score

    return f"und {format_score(res, 'und')}  gen {format_score(res, 'gen')}  gap {format_score(res, 'gap', '+.3f')}"


def _curation(cfg: SelfPlayConfig, wm, info: DistInfo, say: Callable[[str], None]):
    """(train records, held-out world records or None, caption_scorer, answer_match) of the configured source."""
    from hermesflow_fast.world.scoring import answer_match, caption_agreement

    d = cfg.data
    if d.records is None:
        from hermesflow_fast.world import make_records

        train_recs = world_curation_records(wm, make_records(cfg.world.train_records, cfg.world.seed, "train"))
        heldout = make_records(cfg.world.heldout_records, cfg.world.seed, "heldout")
        return train_recs, heldout, caption_agreement, answer_match
    from hermesflow_fast.selfplay.sources import load_real_records, real_scorers

    train_recs = load_real_records(d.records, d.questions, wm.image_tokenizer, strict=d.strict,
                                   batch_size=cfg.curation.batch_size, log=say)
    scorer, matcher = real_scorers(d.scorer_model, d.scorer_kind, d.answer_min_similarity, info.device)
    say(f"real data: {len(train_recs)} records from {d.records} (questions {d.questions}, scorer {d.scorer_kind} "
        f"{d.scorer_model}); held-out evaluation skipped: {EVAL_SKIPPED}")
    return train_recs, None, scorer, matcher


def check_run_dir(cfg: SelfPlayConfig, run_dir: str | Path, resume: bool,
                  allow_config_change: bool = False) -> tuple[list[ConfigChange], bool]:
    """Whether ``run_dir`` may take this run, read-only: (the changes from its recorded config to apply, whether it
    holds anything besides config.yaml). Without ``resume`` the folder must be empty; with it, a changed key is
    refused unless it is one of ``resume.CHANGEABLE_ON_RESUME`` and ``allow_config_change`` (ResumeError)."""
    run_dir = Path(run_dir)
    entries = [p.name for p in run_dir.iterdir()] if run_dir.is_dir() else []
    history = any(name != CONFIG_FILE for name in entries)
    if not resume:
        if entries:
            raise ResumeError(f"run dir {run_dir} is not empty; pass --resume to continue it or choose another one")
        return [], False
    stored = read_recorded_config(run_dir / CONFIG_FILE)
    if stored is None:
        return [], history
    changes = config_changes(stored, cfg, defaults=SelfPlayConfig())
    if history:
        judge_changes(changes, run_dir / CONFIG_FILE, allow_config_change,
                      f"start another --run-dir for the new settings (world.base={run_dir}/round-R/model begins "
                      f"from a finished round's model)")
    return changes, history


def run_selfplay(cfg: SelfPlayConfig, run_dir: str | Path, rounds: int, resume: bool = False,
                 log: Callable[[str], None] = print, info: DistInfo | None = None,
                 stop_after: str | None = None, allow_config_change: bool = False) -> list[dict]:
    """Rounds 1..``rounds`` after the base (round 0); returns every round's eval dict (round 0 first).

    ``stop_after`` (one of STAGES): return as soon as this call has completed that stage of a round (the round's
    later stages, and the report, wait for a ``resume``): each stage can be run on its own from the command line.
    ``allow_config_change``: on ``resume``, apply changed values of ``resume.CHANGEABLE_ON_RESUME`` keys."""
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"stop_after must be one of {STAGES}, got {stop_after!r}")
    check_data(cfg)
    from hermesflow_fast.train.trainer import Trainer
    from hermesflow_fast.world.base import load_base

    run_dir = Path(run_dir)
    info = info or init_distributed(cfg.dist.backend)
    say = log if info.is_main else (lambda m: None)
    ran: set[str] = set()  # stages this call has run (``stop_after`` counts only those)

    def stopped(r: int) -> bool:
        if stop_after in ran:
            say(f"stopped after round {r}: {stop_after} (--resume continues)")
            return True
        return False

    changes, history = check_run_dir(cfg, run_dir, resume, allow_config_change)  # every rank; nothing written yet
    barrier()  # every rank has read the folder before the main rank writes to it
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        from hermesflow_fast.train.config import save_config

        header = None
        if history:
            if changes:
                say(f"--allow-config-change: applying {describe(changes)} (recorded in {run_dir / CONFIG_FILE})")
            header = changes_header(run_dir / CONFIG_FILE, changes, "on resume")
        save_config(cfg, run_dir / CONFIG_FILE, header=header)
    barrier()
    settings = _settings(cfg)
    wm = load_base(cfg.world.base, device=info.device)
    train_recs, heldout, caption_scorer, answer_matcher = _curation(cfg, wm, info, say)
    mine = train_recs[info.rank::info.world_size]
    order = [r.id for r in train_recs]

    def evaluate_into(wm, rd: Path, diagnose: bool = False) -> dict:
        if heldout is None:
            return _skip_eval_into(rd, info, (lambda: _diagnostics(rd, wm, cfg)) if diagnose else None)
        return _evaluate_into(wm, heldout, cfg, rd, info, diagnose)

    results = [dict(round=0, **evaluate_into(wm, run_dir / "round-0"))]
    say(f"round 0 (base): {_scores(results[0])}")
    previous: dict[str, dict] | None = None
    prev_model = Path(cfg.world.base) if cfg.world.base else None
    for r in range(1, rounds + 1):
        rd = run_dir / f"round-{r}"
        rd.mkdir(parents=True, exist_ok=True)

        def journal(stage: str, rd: Path = rd) -> Journal:
            return Journal(rd / f"{stage}.jsonl", rank=info.rank if info.distributed else None)

        def finish(stage: str, rd: Path = rd) -> Journal:
            if info.distributed:
                barrier()
                if info.is_main:
                    merge_shards(rd / f"{stage}.jsonl", info.world_size, order)
                barrier()
            _mark(rd, stage, info)
            return Journal(rd / f"{stage}.jsonl")

        def full(stage: str, rd: Path = rd) -> Journal:
            return Journal(rd / f"{stage}.jsonl")

        wm.model.eval()
        if not _done_everywhere(rd, "und_candidates"):
            ran.add("und_candidates")
            say(f"round {r}: captions ({len(settings.caption_grid)} per image, {len(train_recs)} images)")
            und_candidates(wm, mine, journal("und_candidates"), settings, r)
            finish("und_candidates")
        if stopped(r):
            return results
        if not _done_everywhere(rd, "und_scores"):
            ran.add("und_scores")
            und_scores(mine, full("und_candidates"), journal("und_scores"), caption_scorer)
            finish("und_scores")
        if stopped(r):
            return results
        if not _done_everywhere(rd, "gen_candidates"):
            ran.add("gen_candidates")
            say(f"round {r}: images ({settings.images_per_prompt} per prompt)")
            gen_candidates(wm, mine, journal("gen_candidates"), settings, r,
                           images_dir=rd / "images" if cfg.curation.save_images else None)
            finish("gen_candidates")
        if stopped(r):
            return results
        if not _done_everywhere(rd, "gen_scores"):
            ran.add("gen_scores")
            say(f"round {r}: self-VQA")
            gen_scores(wm, mine, full("gen_candidates"), journal("gen_scores"), settings, answer_matcher)
            finish("gen_scores")
        if stopped(r):
            return results
        if not _done_everywhere(rd, "pairs"):
            ran.add("pairs")
            if info.is_main:
                stats = build_pairs(train_recs, full("und_candidates"), full("und_scores"), full("gen_candidates"),
                                    full("gen_scores"), previous, settings.vqa_threshold, rd / "pairs.jsonl")
                say(f"round {r}: pairs {json.dumps({k: stats[k] for k in ('pairs', 'und', 'gen')})}")
            _mark(rd, "pairs", info)
        if stopped(r):
            return results
        previous = {}
        for line in (rd / "pairs.jsonl").read_text().splitlines():
            p = json.loads(line)
            previous[p["id"]] = p
        model_dir = rd / "model"
        if not _done_everywhere(rd, "train"):
            ran.add("train")
            init = prev_model
            if init is None:  # the shipped base: train from a folder copy of it
                init = run_dir / "round-0" / "model"
                if info.is_main and not (init / "config.json").is_file():
                    wm.save(init)
                barrier()
            tcfg = _train_config(cfg, init, wm)
            pairs = _tokenized_pairs(wm, train_recs, rd / "pairs.jsonl")
            data = TrainData(wm.vocab, wm.layout, pairs, f"round {r}: {len(pairs)} pairs", wm.num_image_tokens)
            resume_train = (rd / "train" / "checkpoints").is_dir() and any((rd / "train" / "checkpoints").iterdir())
            trainer = Trainer(tcfg, run_dir=rd / "train", resume=resume_train, info=info, log=say, data=data,
                              allow_config_change=allow_config_change, derived_keys=("model.init_from",))
            trainer.setup()
            trainer.train()
            if info.is_main:
                wm.model = trainer.policy.eval()
                wm.save(model_dir)
            barrier()
            _mark(rd, "train", info)
        if stopped(r):
            return results
        wm = load_base(model_dir, device=info.device)
        prev_model = model_dir
        if not _done(rd, "eval"):
            ran.add("eval")
        res = dict(round=r, **evaluate_into(wm, rd, diagnose=True))
        results.append(res)
        say(f"round {r}: {_scores(res)}")
        if stopped(r):
            return results
    if info.is_main:
        from hermesflow_fast.selfplay.report import write_report

        write_report(run_dir, results, config_to_dict(cfg))
    return results
