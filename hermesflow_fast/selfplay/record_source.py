"""Where a self-play run's records come from, behind one interface: the curation records, how captions are scored
against their truth, how free-form answers map to a choice, and what the held-out evaluation reads.

    src = record_source(cfg, bundle, device, log)      # the shapes world, or real data when data.records is set
    src.records            curation records (CurationRecord: id, prompt, image codes, questions, truth)
    src.caption_scorer     (caption, truth) → score                    und_scores
    src.answer_matcher     (answer, choices) → choice or None           gen_scores
    src.heldout            world records the judge evaluates each round; None for real data (no judge)
    src.diagnose           what diagnose_round needs to know of the records (selfplay/diagnose.py's RoundSource)

    shapes world    ``world.train_records`` rendered records encoded by the bundle's image tokenizer; caption scorer =
                    exact attribute agreement, answer matcher = the world's exact match; ``world.heldout_records``
                    held-out records
    real data       a records file + TIFA questions (selfplay/sources.py), images encoded once; caption scorer and
                    answer matcher over the local text embedder ``data.scorer_model`` (selfplay/scorers.py)

    python -m pytest -q tests/selfplay/test_sources.py tests/selfplay/test_rounds.py
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hermesflow_fast.selfplay.config import SelfPlayConfig
from hermesflow_fast.selfplay.diagnose import RoundSource
from hermesflow_fast.selfplay.stages import CurationRecord

__all__ = ["EVAL_SKIPPED", "RecordSource", "real_data_source", "record_source", "world_curation_records",
           "world_source"]

EVAL_SKIPPED = "real data (data.records): the held-out evaluation needs the shapes world's judge"


@dataclass
class RecordSource:
    records: list[CurationRecord]
    caption_scorer: Callable[[str, Any], float]
    answer_matcher: Callable[[str, Sequence[str]], str | None]
    heldout: list | None  # world records for the held-out judge; None: no held-out evaluation (real data)
    diagnose: RoundSource
    description: str


def world_curation_records(bundle, records) -> list[CurationRecord]:
    """World records → curation records: each rendered image encoded once by the bundle's image tokenizer
    (``world.evaluate.encode_records``, what the evaluation encodes the held-out records with)."""
    from hermesflow_fast.world.evaluate import encode_records

    codes = encode_records(bundle, records)
    return [CurationRecord(r.id, r.prompt, c, list(r.questions), r.scene) for r, c in zip(records, codes)]


def world_source(cfg: SelfPlayConfig, bundle) -> RecordSource:
    from hermesflow_fast.world import make_records
    from hermesflow_fast.world.scoring import answer_match, caption_agreement

    w = cfg.world
    records = world_curation_records(bundle, make_records(w.train_records, w.seed, "train"))
    return RecordSource(records, caption_agreement, answer_match, make_records(w.heldout_records, w.seed, "heldout"),
                        RoundSource(True, w.seed, "world.seed"),
                        f"the shapes world: {len(records)} records (seed {w.seed})")


def real_data_source(cfg: SelfPlayConfig, bundle, device: torch.device | str,
                     log: Callable[[str], None]) -> RecordSource:
    from hermesflow_fast.selfplay.sources import load_real_records, real_scorers

    d = cfg.data
    records = load_real_records(d.records, d.questions, bundle.image_tokenizer, strict=d.strict,
                                batch_size=cfg.curation.batch_size, log=log)
    scorer, matcher = real_scorers(d.scorer_model, d.scorer_kind, d.answer_min_similarity, device, d.answer_model,
                                   d.answer_kind)
    return RecordSource(records, scorer, matcher, None,
                        RoundSource(False, real_reason=f"real data (data.records={d.records})"),
                        f"real data: {len(records)} records from {d.records} (questions {d.questions}, scorer "
                        f"{d.scorer_kind} {d.scorer_model}); held-out evaluation skipped: {EVAL_SKIPPED}")


def record_source(cfg: SelfPlayConfig, bundle, device: torch.device | str,
                  log: Callable[[str], None]) -> RecordSource:
    """The configured source: real data when ``data.records`` is set, else the shapes world."""
    if cfg.data.records is None:
        return world_source(cfg, bundle)
    return real_data_source(cfg, bundle, device, log)
