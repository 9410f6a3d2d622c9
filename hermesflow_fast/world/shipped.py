"""The shapes world's shipped base model (``hermesflow_fast/world/base/``, made by ``hermesflow pretrain --world
shapes``) and the world's text budgets.

    python -c "from hermesflow_fast.world.shipped import load_base; print(load_base())"
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from hermesflow_fast.model.bundle import ModelBundle, load_bundle

__all__ = ["BASE_DIR", "WORLD_LAYOUT", "load_base"]

BASE_DIR = Path(__file__).resolve().parent / "base"
# The world's text budgets: a t2i prompt is ≤ 10 words (+ [t2i][bos] … [eos] = 13 ≤ 16); an mmu text is ≤ 23
# tokens for training texts (question + answer + eos), 48 leaves room for longer sampled captions in self-play.
WORLD_LAYOUT = {"t2i_text_len": 16, "mmu_text_len": 48}


def load_base(path: str | os.PathLike | None = None, device: torch.device | str = "cpu") -> ModelBundle:
    """The bundle at ``path`` (default: the shipped base), in eval mode; a folder without a layout of its own gets
    the world's (``WORLD_LAYOUT``)."""
    path = Path(BASE_DIR if path is None else path)
    hint = " (make it with `hermesflow pretrain --world shapes`)" if path == BASE_DIR else ""
    return load_bundle(path, device=device, default_layout=WORLD_LAYOUT, hint=hint)
