"""The shapes world's knobs: which records (``WorldSection``), how the held-out evaluation samples
(``EvalSection``) and how the base is pretrained (``PretrainConfig``). Each knob has its one default here; the
self-play schema (selfplay/config.py) nests the first two, ``hermesflow eval`` and ``hermesflow pretrain`` make their
options from them (hermesflow_fast/config.py's ``knob_options``).

    python -m pytest -q tests/test_config_system.py
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from hermesflow_fast.config import ConfigError, knob, validate

if TYPE_CHECKING:
    from hermesflow_fast.model.config import ModelConfig

__all__ = ["WORLDS", "EvalSection", "PretrainConfig", "SamplerSection", "WorldSection"]

WORLDS = ("shapes",)


@dataclass
class WorldSection:
    base: str | None = knob(None, "start model folder (a saved ModelBundle); None → the shipped shapes-world base "
                                  "(hermesflow_fast/world/base)")
    train_records: int = knob(256, "world records curated each round", ge=1)
    heldout_records: int = knob(64, "held-out records the evaluation uses (never curated or trained on)", ge=1)
    seed: int = knob(0, "seed of the world's records", ge=0)


@dataclass
class SamplerSection:
    """The knobs every sampling pass shares (curation's and the evaluation's), declared once."""

    steps: int = knob(12, "MaskGIT steps", ge=1)
    guidance_scale: float = knob(3.0, "classifier-free guidance g", ge=0.0)
    noise_temperature: float = knob(1.0, "Gumbel noise τ₀ of the confidence", ge=0.0)
    compounding_noise: bool = knob(False, "τ_s = τ_{s−1}·(1 − r) each step, as Show-o's t2i_generate compounds it; "
                                          "false: τ₀·(1 − r), MaskGIT's schedule (docs/differences.md)")
    batch_size: int = knob(32, "records per generation call", ge=1)
    caption_tokens: int = knob(24, "max new tokens of a caption", ge=1)
    answer_tokens: int = knob(4, "max new tokens of an answer", ge=1)


@dataclass
class EvalSection(SamplerSection):
    images_per_prompt: int = knob(1, "generated images per held-out prompt", ge=1)
    seeds: int = knob(1, "evaluation seeds run.seed, run.seed + 1, …: und / gen / gap are their mean, "
                         "und_std / gen_std / gap_std their standard deviation", ge=1)


@dataclass
class PretrainConfig:
    world: Literal["shapes"] = knob("shapes", "which world")
    records: int = knob(4000, "train records", ge=1)
    steps: int = knob(1500, "optimizer steps", ge=1)
    seed: int = knob(0, "seed of everything: records, initialisation, batches, masks, dropout", ge=0)
    # image tokenizer
    patch_size: int = knob(8, "VQ patch size: 32 px / 8 = a 4×4 grid, N = 16, one token per grid cell", ge=1)
    num_codes: int = knob(16, "VQ codes (the world draws 13 distinct cells: 12 glyphs + empty, so 16 is lossless)",
                          ge=1)
    vq_images: int = knob(1000, "k-means on the first vq_images train images", ge=1)
    vq_iters: int = knob(10, "k-means iterations", ge=1)
    # model (Phi)
    hidden_size: int = knob(128, "model width d", ge=1)
    num_layers: int = knob(4, "transformer blocks", ge=1)
    num_heads: int = knob(4, "attention heads", ge=1)
    intermediate_size: int = knob(512, "MLP width", ge=1)
    # batch: rows per task and step
    batch_t2i: int = knob(32, "t2i rows per step", ge=1)
    batch_und: int = knob(16, "images per step whose caption and every question ride in one packed row", ge=1)
    cond_dropout: float = knob(0.1, "t2i prompt dropout (classifier-free guidance)", ge=0.0, lt=1.0)
    caption_noise: float = knob(0.4, "t2i prompts that are a near miss of their image's caption (world/noise.py)",
                                ge=0.0, le=1.0)
    vqa_perturb: float = knob(0.5, "understanding images that miss their caption, answered as the judge reads them",
                              ge=0.0, le=1.0)
    probe_questions: bool = knob(True, "every understanding image also gets a count and a where-is question")
    sot_prob: float = knob(0.5, "mmu rows with <|sot|> before the prompt", ge=0.0, le=1.0)
    coeffs: list[float] = knob([1.0, 1.0, 1.0], "loss weights of t2i, caption, vqa")
    # optimisation
    lr: float = knob(2e-3, "peak learning rate (AdamW)", gt=0.0)
    weight_decay: float = knob(0.01, "AdamW weight decay (not on biases, norms, embeddings)", ge=0.0)
    warmup_steps: int = knob(100, "linear warm-up steps (capped at steps // 10 for short runs)", ge=0)
    min_lr_ratio: float = knob(0.1, "the cosine ends at this fraction of the peak lr", ge=0.0, le=1.0)
    grad_clip: float = knob(1.0, "gradient norm clipping", gt=0.0)
    # evaluation at the end
    eval_records: int = knob(300, "held-out records evaluated at the end (0: none)", ge=0)
    eval: EvalSection = field(default_factory=EvalSection)
    log_every: int = knob(50, "log the losses every N steps", ge=1)

    def __post_init__(self) -> None:
        validate(self, default_origin="PretrainConfig")

    def check(self, where) -> None:
        if len(self.coeffs) != 3:
            raise ConfigError(f"{where('coeffs')}: 'coeffs' = {self.coeffs} must be three weights (t2i, caption, vqa)")

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The transformer's ModelConfig for a vocabulary of ``vocab_size`` ids."""
        from hermesflow_fast.model.config import ModelConfig

        return ModelConfig(vocab_size=vocab_size, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                           num_attention_heads=self.num_heads, max_position_embeddings=256)
