"""The self-play recipe's schema (YAML + dotted overrides through hermesflow_fast/config.py).

    hermesflow selfplay --config configs/selfplay-shapes.yaml --run-dir runs/sp --rounds 2 curation.steps=8
    hermesflow selfplay --config configs/selfplay-real.yaml --run-dir runs/real data.records=… data.questions=… \
                        data.scorer_model=…          real data instead of the shapes world (selfplay/sources.py)

``check_data(cfg)`` holds the ``data`` section's cross-field rules (a ConfigError naming the key).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hermesflow_fast.config import ConfigError, knob
from hermesflow_fast.data.text import DEFAULT_QUESTION
from hermesflow_fast.train.config import CheckpointSection, DistSection, LogSection, RunSection, TrainSection
from hermesflow_fast.world.config import EvalSection, SamplerSection, WorldSection

__all__ = ["CurationSection", "DataSection", "EvalSection", "SelfPlayConfig", "WorldSection", "check_data"]


@dataclass
class DataSection:
    records: str | None = knob(None, "real-data records file (JSONL: id, image, caption[, prompt]; "
                                       "selfplay/sources.py); None → the shapes world (world.*)")
    questions: str | None = knob(None, "TIFA question file (JSON array or JSONL) joined to the records by id; "
                                         "required with data.records")
    scorer_model: str | None = knob(None, "local model folder of the text embedder that scores captions and maps "
                                            "answers to choices; required with data.records (nothing is downloaded)")
    scorer_kind: Literal["sbert", "bert-cls"] = knob("sbert", "sbert (sentence-transformers folder) or bert-cls "
                                                                "(a BERT folder, [CLS] cosine as the original code)")
    answer_model: str | None = knob(None, "local text-embedder folder that maps self-VQA answers to choices; None → "
                                          "data.scorer_model (the original: BERT-CLS scores captions, SBERT "
                                          "all-mpnet-base-v2 maps answers)")
    answer_kind: Literal["sbert", "bert-cls"] | None = knob(None, "kind of data.answer_model; None → data.scorer_kind")
    answer_min_similarity: float = knob(0.5, "a free-form self-VQA answer maps to its nearest choice only at this "
                                               "cosine or above (an exact match always counts)", ge=-1.0, le=1.0)
    strict: bool = knob(True, "a bad record or question is an error naming file, line and id; false → skip it "
                                "and log the count")


@dataclass
class CurationSection(SamplerSection):
    caption_grid: list[list[float]] = knob(
        [[1, 0.0], [2, 0.1], [2, 0.7], [2, 2.0], [3, 0.1], [3, 0.7], [3, 2.0], [4, 0.1], [4, 0.7], [4, 2.0]],
        "(top_k, temperature) per caption; temperature 0 = greedy (the paper's code: greedy + {2,3,4} × {0.1,0.7,2})")
    images_per_prompt: int = knob(8, "generated images per prompt (M)", ge=2)
    vqa_threshold: float = knob(0.6, "a generation pair needs its winner's self-VQA accuracy above this", ge=0.0)
    caption_question: str = knob(DEFAULT_QUESTION, "the instruction of the caption prompt \"USER: {q} ASSISTANT:\" "
                                                   "(sampled after <|sot|>); the original's curation: "
                                                   "\"\\nGive a caption for this image.\"")
    vqa_prompt: Literal["plain", "hermesflow"] = knob(
        "plain", "self-VQA question wording: plain \"{question} choices: a, b\", or the original's "
                 "\"\\nQuestion:{question} Choice:['a', 'b']\"")
    reencode_images: bool = knob(False, "self-VQA reads each generated image decoded to 8-bit pixels and encoded "
                                        "again (the original answers about the saved PNGs); false: the token grids "
                                        "as generated")
    save_images: bool = knob(False, "also decode each generated candidate to round-r/images/<id>/<k>.png (for "
                                     "people and pixel-reading judges; curation itself reads the token grids)")

    def check(self, where) -> None:
        for entry in self.caption_grid:
            if len(entry) != 2 or entry[0] < 1 or entry[0] != int(entry[0]) or entry[1] < 0:
                raise ConfigError(f"{where('caption_grid')}: 'curation.caption_grid' entry {entry} must be [top_k, "
                                  f"temperature] with an integer top_k ≥ 1 and temperature ≥ 0")
        if not self.caption_grid:
            raise ConfigError(f"{where('caption_grid')}: 'curation.caption_grid' is empty")

    def grid(self) -> tuple[tuple[int, float], ...]:
        """``caption_grid`` as (top_k, temperature) pairs."""
        return tuple((int(k), float(t)) for k, t in self.caption_grid)


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
        stray = [k for k in ("questions", "scorer_model", "answer_model") if getattr(d, k) is not None]
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
    if d.answer_model is not None and not Path(d.answer_model).is_dir():
        raise ConfigError(f"'data.answer_model' = {d.answer_model!r} does not exist or is not a local text-embedder "
                          f"model folder")
