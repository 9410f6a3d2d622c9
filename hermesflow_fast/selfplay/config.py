"""The self-play recipe's schema (YAML + dotted overrides through train/config.py's machinery).

    hermesflow selfplay --config configs/selfplay-shapes.yaml --run-dir runs/sp --rounds 2 curation.steps=8
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hermesflow_fast.train.config import (
    CheckpointSection,
    DistSection,
    LogSection,
    RunSection,
    TrainSection,
    _field,
)

__all__ = ["CurationSection", "EvalSection", "SelfPlayConfig", "WorldSection"]


@dataclass
class WorldSection:
    base: str | None = _field(None, "base model folder; None → the shipped shapes-world base (world/base)")
    train_records: int = _field(256, "world records curated each round", ge=1)
    heldout_records: int = _field(64, "held-out records the evaluation uses (never curated or trained on)", ge=1)
    seed: int = _field(0, "seed of the world's records", ge=0)


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


@dataclass
class EvalSection:
    images_per_prompt: int = _field(1, "generated images per held-out prompt", ge=1)
    steps: int = _field(12, "MaskGIT steps", ge=1)
    guidance_scale: float = _field(3.0, "classifier-free guidance g", ge=0.0)
    batch_size: int = _field(32, "records per generation call", ge=1)


@dataclass
class SelfPlayConfig:
    run: RunSection = field(default_factory=RunSection)
    world: WorldSection = field(default_factory=WorldSection)
    curation: CurationSection = field(default_factory=CurationSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    dist: DistSection = field(default_factory=DistSection)
