"""The training schema: ``TrainConfig``'s sections and knobs (hermesflow_fast/config.py is the machinery).

    cfg = load_config("configs/tiny.yaml", ["train.lr=1e-5", "data.strict=false", "model.init_from=/x"])

Each knob's default is the HermesFlow paper's value with the released code's bugs fixed (docs/differences.md).
``load_config`` and ``config_keys`` here default to ``schema=TrainConfig``; the rest is ``hermesflow_fast.config``'s.

    python -m pytest -q tests/train/test_config.py
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from hermesflow_fast.config import ConfigError, config_to_dict, knob, save_config
from hermesflow_fast.config import config_keys as _config_keys
from hermesflow_fast.config import load_config as _load_config

__all__ = [
    "CheckpointSection",
    "ConfigError",
    "DataSection",
    "DistSection",
    "LogSection",
    "ModelSection",
    "RunSection",
    "TrainConfig",
    "TrainSection",
    "config_keys",
    "config_to_dict",
    "load_config",
    "save_config",
]

T = TypeVar("T")


@dataclass
class RunSection:
    name: str = knob("run", "run name (used for the default run dir runs/<name>)")
    run_dir: str | None = knob(None, "output folder; None → runs/<name>")
    seed: int = knob(0, "global seed (each rank adds its rank)", ge=0)


@dataclass
class ModelSection:
    init_from: str | None = knob(None, "folder with weights in HF Phi, Show-o or our layout; None → random init")
    config: Literal["tiny", "show_o_512"] | None = knob(None, "named architecture when init_from has no config")
    vocab: str | None = knob(None, "vocabulary JSON (token layout); None → the one next to the weights")
    attn_backend: Literal["auto", "sdpa", "flex", "varlen", "flash", "eager"] = knob(
        "auto", "attention backend (model/attention.py); auto → varlen on CUDA for packed pairs")
    dtype: Literal["auto", "fp32", "bf16"] = knob("auto", "compute dtype; auto → bf16 autocast on CUDA, fp32 on CPU")
    compile: bool | None = knob(None, "torch.compile the blocks; None → on for CUDA")
    activation_checkpointing: bool = knob(False, "recompute block activations in backward (saves memory)")


@dataclass
class DataSection:
    pairs: str | None = knob(None, "pairs file (JSONL, or HermesFlow's pair_dpo_data.json with format=hermesflow)")
    format: Literal["jsonl", "hermesflow"] = knob("jsonl", "format of the pairs file")
    image_root: str | None = knob(None, "folder image paths are relative to (HermesFlow: its repo root); "
                                          "None → the pairs file's folder")
    token_cache: str | None = knob(None, "token cache folder of the pairs' images (hermesflow tokenize)")
    image_tokenizer: str | None = knob(None, "image tokenizer folder (used when an image is not in the cache)")
    text_tokenizer: str | None = knob(None, "text tokenizer folder or file")
    strict: bool = knob(True, "refuse the run on any invalid pair instead of dropping and counting it")
    truncate: bool = knob(True, "truncate captions/prompts longer than the budget instead of refusing them")
    max_caption_tokens: int = knob(128, "max caption tokens (Show-o max_seq_length); was data.text_budget", ge=1)
    t2i_text_len: int = knob(129, "text slots of a t2i sequence (Show-o max_text_len = 128 + 1)", ge=1)
    token_budget: int = knob(4096, "tokens per micro-batch (packed sequences)", ge=1)
    synthetic_pairs: int = knob(0, "> 0: make this many pairs of random captions, prompts and image codes (seeded "
                                     "by run.seed) instead of reading files: for smoke tests and benchmarks", ge=0)


@dataclass
class TrainSection:
    beta: float = knob(0.2, "DPO β (KL strength)", gt=0.0)
    loss_type: Literal[
        "sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
        "discopop",
    ] = knob("sigmoid", "DPO loss (ops.dpo.DPO_LOSS_TYPES)")
    label_smoothing: float = knob(0.0, "ε for cDPO / robust / exo_pair", ge=0.0, lt=1.0)
    und_coeff: float = knob(1.0, "weight of the understanding (caption) DPO term", ge=0.0)
    gen_coeff: float = knob(1.0, "weight of the generation (image) DPO term", ge=0.0)
    batch_size: int = knob(4, "pairs per micro-step over all ranks (paper: 4); each rank's share runs in "
                                "micro-batches of <= data.token_budget tokens", ge=1)
    lr: float = knob(2e-5, "peak learning rate (AdamW)", gt=0.0)
    weight_decay: float = knob(0.01, "AdamW decoupled weight decay (not on biases, norms, embeddings)", ge=0.0)
    adam_betas: list[float] = knob([0.9, 0.999], "AdamW (β1, β2)")
    adam_eps: float = knob(1e-8, "AdamW ε", gt=0.0)
    warmup_steps: int = knob(0, "linear warm-up steps; 0 → warmup_ratio × total steps", ge=0)
    warmup_ratio: float = knob(0.1, "warm-up fraction of the actual total steps when warmup_steps == 0", ge=0.0,
                                 lt=1.0)
    max_steps: int | None = knob(None, "optimizer steps; None → epochs × steps per epoch of the data", ge=1)
    epochs: int = knob(1, "passes over the pairs when max_steps is None", ge=1)
    grad_accum: int = knob(1, "micro-steps of batch_size pairs per optimizer step: a step takes batch_size × "
                                "grad_accum pairs over all ranks, each pair weighing the same (accum 2 × batch B = "
                                "batch 2B)", ge=1)
    max_grad_norm: float | None = knob(1.0, "gradient clipping norm; None → no clipping", gt=0.0)
    precompute_ref_logps: bool = knob(False, "reference log-probs computed once before training (no ref model)")
    nan_policy: Literal["stop", "skip"] = knob("stop", "a non-finite loss/grad: stop the run, or skip the step")
    text_dropout: float = knob(0.0, "prompt-drop probability for t2i pairs: one draw per pair (never per side)",
                                 ge=0.0, le=1.0)
    rpo_alpha: float = knob(0.0, "α of RPO (TRL's rpo_alpha): α × the chosen sequence's NLL per token added to "
                                   "each side's loss, per pair (TRL adds α × the batch's mean NLL over all chosen "
                                   "tokens; here each pair's own per-token mean, averaged like the DPO term, so a "
                                   "step's loss does not depend on how its pairs are split); 0 → plain DPO",
                              ge=0.0)
    gen_masks: int = knob(1, "masks per generation pair: logπ of an image is the mean over its masks, each drawn "
                               "from (pair id, epoch, seed, mask index) and shared by policy, reference, chosen and "
                               "rejected; the masks ride as extra branches of the pair's one sequence (M × the "
                               "image tokens); 1 → Show-o's one draw", ge=1)
    gen_logp: Literal["sum", "mean"] = knob("sum", "per gen mask: the sum of the masked slots' log-probs (Show-o) or "
                                                     "their mean per masked slot (every mask weighs the same "
                                                     "whatever its size; rescales β's effect by ~1/k)")
    gen_mask_ratio: list[float] = knob([0.0, 1.0], "(min, max) of a gen mask's ratio: Show-o's cosine law "
                                                     "r = cos(πt/2) restricted to min ≤ r ≤ max; [0, 1] → unchanged")

    def check(self, where) -> None:
        """Cross-field rules: two Adam betas in [0, 1); a gen-mask ratio range inside [0, 1]."""
        betas = self.adam_betas
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"{where('adam_betas')}: 'train.adam_betas' = {betas} must be two numbers in [0, 1)")
        ratio = self.gen_mask_ratio
        if len(ratio) != 2 or not (0.0 <= ratio[0] <= ratio[1] <= 1.0 and ratio[1] > 0.0):
            raise ConfigError(f"{where('gen_mask_ratio')}: 'train.gen_mask_ratio' = {ratio} must be [min, max] with "
                              f"0 <= min <= max <= 1 and max > 0")


@dataclass
class CheckpointSection:
    every: int = knob(100, "save every N optimizer steps (and at the end)", ge=1)
    keep: int = knob(3, "complete checkpoints kept (older ones deleted); 0 → keep all", ge=0)


@dataclass
class LogSection:
    every: int = knob(1, "log metrics every N optimizer steps", ge=1)
    tensorboard: bool = knob(False, "also log to TensorBoard (needs tensorboard)")
    wandb: bool = knob(False, "also log to Weights & Biases (needs wandb)")
    progress: bool = knob(True, "progress bar on rank 0 when stdout is a terminal")


@dataclass
class DistSection:
    strategy: Literal["ddp", "fsdp"] = knob("ddp", "data parallelism: DDP, or FSDP2 (fully_shard)")
    backend: Literal["auto", "gloo", "nccl"] = knob("auto", "process-group backend; auto → nccl on CUDA, else gloo")


@dataclass
class TrainConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    dist: DistSection = field(default_factory=DistSection)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                schema: type[T] = TrainConfig) -> T:  # type: ignore[assignment]
    """``hermesflow_fast.config.load_config`` with ``schema`` defaulting to ``TrainConfig``."""
    return _load_config(path, overrides, schema=schema)


def config_keys(schema: type = TrainConfig) -> list[str]:
    """``hermesflow_fast.config.config_keys`` with ``schema`` defaulting to ``TrainConfig``."""
    return _config_keys(schema)
