"""The self-play recipe's schema (YAML + dotted overrides through train/config.py's machinery).

    hermesflow selfplay --config configs/selfplay-shapes.yaml --run-dir runs/sp --rounds 2 curation.steps=8
    hermesflow selfplay --config configs/selfplay-real.yaml --run-dir runs/real data.records=… data.questions=… \
                        data.scorer_model=…          real data instead of the shapes world (selfplay/sources.py)

``check_data(cfg)`` holds the ``data`` section's cross-field rules (a ConfigError naming the key).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hermesflow_fast.train.config import (
    CheckpointSection,
    ConfigError,
    DistSection,
    LogSection,
    RunSection,
    TrainSection,
    _field,
)

__all__ = ["CurationSection", "DataSection", "EvalSection", "SelfPlayConfig", "WorldSection", "check_data"]


@dataclass
class WorldSection:
    base: str | None = _field(None, "base model folder; None → the shipped shapes-world base (world/base)")
    train_records: int = _field(256, "world records curated each round", ge=1)
    heldout_records: int = _field(64, "held-out records the evaluation uses (never curated or trained on)", ge=1)
    seed: int = _field(0, "seed of the world's records", ge=0)


@dataclass
class DataSection:
    records: str | None = _field(None, "real-data records file (JSONL: id, image, caption[, prompt]; "
                                       "selfplay/sources.py); None → the shapes world (world.*)")
    questions: str | None = _field(None, "TIFA question file (JSON array or JSONL) joined to the records by id; "
                                         "required with data.records")
    scorer_model: str | None = _field(None, "local model folder of the text embedder that scores captions and maps "
                                            "answers to choices; required with data.records (nothing is downloaded)")
    scorer_kind: Literal["sbert", "bert-cls"] = _field("sbert", "sbert (sentence-transformers folder) or bert-cls "
                                                                "(a BERT folder, [CLS] cosine as the original code)")
    answer_min_similarity: float = _field(0.5, "a free-form self-VQA answer maps to its nearest choice only at this "
                                               "cosine or above (an exact match always counts)", ge=-1.0, le=1.0)
    strict: bool = _field(True, "a bad record or question is an error naming file, line and id; false → skip it "
                                "and log the count")


@dataclass
class CurationSection:
    caption_grid: list[list[float]] = _field(
        [[1, 0.0], [2, 0.1], [2, 0.7], [2, 2.0], [3, 0.1], [3, 0.7], [3, 2.0], [4, 0.1], [4, 0.7], [4, 2.0]],
        "(top_k, temperature) per caption; temperature 0 = greedy (the paper's code: greedy + {2,3,4} × {0.1,0.7,2})")
    images_per_prompt: int = _field(8, "generated images per prompt (M)", ge=2)
    steps: int = _field(12, "MaskGIT steps", ge=1)
    guidance_scale: float = _field(3.0, "classifier-free guidance g", ge=0.0)
    noise_temperature: float = _field(1.0, "Gumbel noise τ₀ of the confidence", ge=0.0)
    vqa_threshold: float = _field(0.6, "a generation pair needs its winner's self-VQA accuracy above this", ge=0.0)
    caption_tokens: int = _field(24, "max new tokens of a caption", ge=1)
    answer_tokens: int = _field(4, "max new tokens of a self-VQA answer", ge=1)
    batch_size: int = _field(32, "records per generation call", ge=1)
    save_images: bool = _field(False, "also decode each generated candidate to round-r/images/<id>/<k>.png (for "
                                      "people and pixel-reading judges; curation itself reads the token grids)")


@dataclass
class EvalSection:
    images_per_prompt: int = _field(1, "generated images per held-out prompt", ge=1)
    steps: int = _field(12, "MaskGIT steps", ge=1)
    guidance_scale: float = _field(3.0, "classifier-free guidance g", ge=0.0)
    noise_temperature: float = _field(1.0, "Gumbel noise τ₀ of the confidence", ge=0.0)
    seeds: int = _field(1, "evaluation seeds run.seed, run.seed + 1, …: und / gen / gap are their mean, "
                           "und_std / gen_std / gap_std their standard deviation", ge=1)
    batch_size: int = _field(32, "records per generation call", ge=1)


@dataclass
class SelfPlayConfig:
    run: RunSection = field(default_factory=RunSection)
    world: WorldSection = field(default_factory=WorldSection)
    data: DataSection = field(default_factory=DataSection)
    curation: CurationSection = field(default_factory=CurationSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    dist: DistSection = field(default_factory=DistSection)


def check_data(cfg: SelfPlayConfig) -> None:
    """The ``data`` section's cross-field rules: with ``records``, ``questions`` and ``scorer_model`` are required and
    every path must exist; without it, neither may be set (the run would silently be the shapes world)."""
    d = cfg.data
    if d.records is None:
        stray = [k for k in ("questions", "scorer_model") if getattr(d, k) is not None]
        if stray:
            raise ConfigError(f"'data.{stray[0]}' is set but 'data.records' is not: set data.records to a real-data "
                              f"records file, or unset data.{stray[0]} to run on the shapes world")
        return
    wants = (("records", "a records file (JSONL)", Path.is_file), ("questions", "a TIFA question file", Path.is_file),
             ("scorer_model", "a local text-embedder model folder", Path.is_dir))
    for key, what, ok in wants:
        value = getattr(d, key)
        if value is None:
            raise ConfigError(f"'data.{key}' is required when 'data.records' is set: {what}")
        if not ok(Path(value)):
            raise ConfigError(f"'data.{key}' = {value!r} does not exist or is not {what}")
