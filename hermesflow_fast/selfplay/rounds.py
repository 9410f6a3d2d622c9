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
                    model/                     M_r (a ModelBundle folder)
                    eval.json, samples.png     held-out und / gen / gap, per category; sample generations;
                                               eval.json's "diagnostics": the round's candidates read by the judge
                                               and by self-VQA, and its pairs (selfplay/diagnose.py)
    run_dir/summary.json, report.md, gap.png   every round's scores

A round is the table ``ROUND_STAGES``, run in order by one loop: each stage's work runs only while its
``<stage>.done`` is missing, then its ``load`` (what later stages read of it) runs either way. Each stage leaves
``<stage>.done`` when complete; ``resume`` continues at the first unfinished stage of the first
unfinished round. Before anything is written, a resume compares the requested config with the run's config.yaml
(``check_run_dir``, train/resume.py's rules): a change to curation, data, the world, the model or the training
math is refused, naming each key with old → new (a journal never mixes records of two settings); logging,
checkpointing, execution settings and the training length change only with ``allow_config_change``. With torchrun
(``--nproc N``), each rank curates a disjoint shard of the records into its own journal, merged by id; training runs
DDP over the same ranks.

Records come from one of two sources, chosen by ``data.records`` (selfplay/record_source.py, one interface):

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hermesflow_fast.data.batching import TokenizedPair
from hermesflow_fast.data.text import caption_ids, prompt_ids, und_prompt_ids
from hermesflow_fast.selfplay.config import SelfPlayConfig, check_data
from hermesflow_fast.selfplay.journal import Journal, merge_shards
from hermesflow_fast.selfplay.record_source import EVAL_SKIPPED, RecordSource, record_source
from hermesflow_fast.selfplay.stages import (
    CurationRecord,
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

__all__ = ["EVAL_SKIPPED", "ROUND_STAGES", "STAGES", "Stage", "check_run_dir", "run_selfplay"]


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
    t.data.t2i_text_len, t.data.max_caption_tokens = wm.layout.t2i_text_len, wm.layout.mmu_text_len
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


# ------------------------------------------------------------------------------------------------- a round's state


@dataclass
class _Run:
    """What every stage of every round reads: the run's config, records and ranks, and the model so far."""

    cfg: SelfPlayConfig
    run_dir: Path
    info: DistInfo
    say: Callable[[str], None]
    src: RecordSource
    wm: object  # the ModelBundle of the previous round (round 0: the base)
    prev_model: Path | None  # its folder; None: the shipped base
    allow_config_change: bool
    r: int = 0
    rd: Path = field(default_factory=Path)
    previous: dict[str, dict] | None = None  # the previous round's pairs by id (Eq. 10 from round 2)
    results: list[dict] = field(default_factory=list)

    @property
    def mine(self) -> list[CurationRecord]:
        return self.src.records[self.info.rank::self.info.world_size]

    def journal(self, stage: str) -> Journal:
        """This rank's journal of ``stage`` (a shard of its own with torchrun)."""
        return Journal(self.rd / f"{stage}.jsonl", rank=self.info.rank if self.info.distributed else None)

    def full(self, stage: str) -> Journal:
        """The finished, merged journal of ``stage``."""
        return Journal(self.rd / f"{stage}.jsonl")


def _finish_journal(run: _Run, stage: str) -> None:
    """Merge the ranks' shards of a journaled stage by record id, then mark it done."""
    if run.info.distributed:
        barrier()
        if run.info.is_main:
            merge_shards(run.rd / f"{stage}.jsonl", run.info.world_size, [r.id for r in run.src.records])
        barrier()
    _mark(run.rd, stage, run.info)


# ------------------------------------------------------------------------------------------------------- the stages


def _und_candidates(run: _Run) -> None:
    c = run.cfg.curation
    run.say(f"round {run.r}: captions ({len(c.caption_grid)} per image, {len(run.src.records)} images)")
    und_candidates(run.wm, run.mine, run.journal("und_candidates"), c, run.r, run.cfg.run.seed)


def _und_scores(run: _Run) -> None:
    und_scores(run.mine, run.full("und_candidates"), run.journal("und_scores"), run.src.caption_scorer)


def _gen_candidates(run: _Run) -> None:
    c = run.cfg.curation
    run.say(f"round {run.r}: images ({c.images_per_prompt} per prompt)")
    gen_candidates(run.wm, run.mine, run.journal("gen_candidates"), c, run.r, run.cfg.run.seed,
                   images_dir=run.rd / "images" if c.save_images else None)


def _gen_scores(run: _Run) -> None:
    run.say(f"round {run.r}: self-VQA")
    gen_scores(run.wm, run.mine, run.full("gen_candidates"), run.journal("gen_scores"), run.cfg.curation,
               run.src.answer_matcher)


def _pairs(run: _Run) -> None:
    if run.info.is_main:
        stats = build_pairs(run.src.records, run.full("und_candidates"), run.full("und_scores"),
                            run.full("gen_candidates"), run.full("gen_scores"), run.previous,
                            run.cfg.curation.vqa_threshold, run.rd / "pairs.jsonl")
        run.say(f"round {run.r}: pairs {json.dumps({k: stats[k] for k in ('pairs', 'und', 'gen')})}")
    _mark(run.rd, "pairs", run.info)


def _load_pairs(run: _Run) -> None:
    run.previous = {}
    for line in (run.rd / "pairs.jsonl").read_text().splitlines():
        p = json.loads(line)
        run.previous[p["id"]] = p


def _train(run: _Run) -> None:
    from hermesflow_fast.train.trainer import Trainer

    info, rd = run.info, run.rd
    init = run.prev_model
    if init is None:  # the shipped base: train from a folder copy of it
        init = run.run_dir / "round-0" / "model"
        if info.is_main and not (init / "config.json").is_file():
            run.wm.save(init)
        barrier()
    pairs = _tokenized_pairs(run.wm, run.src.records, rd / "pairs.jsonl")
    data = TrainData(run.wm.vocab, run.wm.layout, pairs, f"round {run.r}: {len(pairs)} pairs",
                     run.wm.num_image_tokens)
    ckpts = rd / "train" / "checkpoints"
    trainer = Trainer(_train_config(run.cfg, init, run.wm), run_dir=rd / "train",
                      resume=ckpts.is_dir() and any(ckpts.iterdir()), info=info, log=run.say, data=data,
                      allow_config_change=run.allow_config_change, derived_keys=("model.init_from",))
    trainer.setup()
    trainer.train()
    if info.is_main:
        run.wm.model = trainer.policy.eval()
        run.wm.save(rd / "model")
    barrier()
    _mark(rd, "train", info)


def _load_model(run: _Run) -> None:
    from hermesflow_fast.world.shipped import load_base

    run.wm = load_base(run.rd / "model", device=run.info.device)
    run.prev_model = run.rd / "model"


def _diagnostics(run: _Run) -> dict:
    """The round's diagnostics (selfplay/diagnose.py) for its eval.json; a round whose files cannot be read says why
    instead of failing the run."""
    from hermesflow_fast.errors import UserError
    from hermesflow_fast.selfplay.diagnose import diagnose_round

    try:
        return diagnose_round(run.rd, run.wm.image_tokenizer, source=run.src.diagnose,
                              decode_batch=run.cfg.eval.batch_size * 8)
    except UserError as exc:
        return {"unavailable": [str(exc)]}


def _eval(run: _Run) -> None:
    """The held-out evaluation on the main rank (every evaluation seed; the others wait in ``_mark``'s barrier);
    real data: no judge, eval.json holds null scores and the reason, and the diagnostics self-VQA gives alone.
    Round 0 (the base) is evaluated without diagnostics."""
    from hermesflow_fast.world.evaluate import evaluate_seeds, save_grid, seed_stats

    cfg, rd = run.cfg, run.rd
    if run.info.is_main:
        if run.src.heldout is None:
            out = {"und": None, "gen": None, "gap": None, "records": 0, "skipped": EVAL_SKIPPED}
        else:
            runs = evaluate_seeds(run.wm, run.src.heldout, cfg.eval, seed=cfg.run.seed)
            out = seed_stats(runs)
            out.update(records=len(run.src.heldout), seeds=[cfg.run.seed + k for k in range(cfg.eval.seeds)])
        if run.r > 0:
            out["diagnostics"] = _diagnostics(run)
        rd.mkdir(parents=True, exist_ok=True)
        (rd / "eval.json").write_text(json.dumps(out, indent=1) + "\n")
        if run.src.heldout is not None:
            save_grid(run.wm, runs[0], rd / "samples.png")
    _mark(rd, "eval", run.info)


def _load_eval(run: _Run) -> None:
    res = dict(round=run.r, **json.loads((run.rd / "eval.json").read_text()))
    run.results.append(res)
    run.say(f"round {run.r}{' (base)' if run.r == 0 else ''}: {_scores(res)}")


@dataclass(frozen=True)
class Stage:
    """One stage of a round: ``work`` runs while ``<name>.done`` is missing (a journaled stage's ranks each write
    their shard, merged and marked after); ``load`` runs either way (what later stages read of it)."""

    name: str
    work: Callable[[_Run], None]
    journaled: bool = False
    load: Callable[[_Run], None] | None = None


ROUND_STAGES = (
    Stage("und_candidates", _und_candidates, journaled=True),
    Stage("und_scores", _und_scores, journaled=True),
    Stage("gen_candidates", _gen_candidates, journaled=True),
    Stage("gen_scores", _gen_scores, journaled=True),
    Stage("pairs", _pairs, load=_load_pairs),
    Stage("train", _train, load=_load_model),
    Stage("eval", _eval, load=_load_eval),
)
STAGES = tuple(s.name for s in ROUND_STAGES)
_EVAL = ROUND_STAGES[-1]


def _run_stage(run: _Run, stage: Stage) -> bool:
    """Run ``stage`` of the current round unless it is done; True when this call did its work."""
    did = False
    if not _done_everywhere(run.rd, stage.name):
        stage.work(run)
        if stage.journaled:
            _finish_journal(run, stage.name)
        did = True
    if stage.load is not None:
        stage.load(run)
    return did


def _scores(res: dict) -> str:
    if res.get("und") is None:
        return "held-out evaluation skipped (real data; eval.json has null scores)"
    from hermesflow_fast.selfplay.report import format_score

    return f"und {format_score(res, 'und')}  gen {format_score(res, 'gen')}  gap {format_score(res, 'gap', '+.3f')}"


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
    from hermesflow_fast.world.shipped import load_base

    run_dir = Path(run_dir)
    info = info or init_distributed(cfg.dist.backend)
    say = log if info.is_main else (lambda m: None)
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
    wm = load_base(cfg.world.base, device=info.device)
    src = record_source(cfg, wm, info.device, say)
    if cfg.data.records is not None:
        say(src.description)
    run = _Run(cfg, run_dir, info, say, src, wm, Path(cfg.world.base) if cfg.world.base else None,
               allow_config_change, r=0, rd=run_dir / "round-0")
    _run_stage(run, _EVAL)
    ran: set[str] = set()  # stages this call has run (``stop_after`` counts only those)
    for r in range(1, rounds + 1):
        run.r, run.rd = r, run_dir / f"round-{r}"
        run.rd.mkdir(parents=True, exist_ok=True)
        run.wm.model.eval()
        for stage in ROUND_STAGES:
            if _run_stage(run, stage):
                ran.add(stage.name)
            if stop_after in ran:
                say(f"stopped after round {r}: {stop_after} (--resume continues)")
                return run.results
    if info.is_main:
        from hermesflow_fast.selfplay.report import write_report

        write_report(run_dir, run.results, config_to_dict(cfg))
    return run.results
