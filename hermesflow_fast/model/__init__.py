"""The unified model: Show-o-compatible transformer, token layout and masks, attention backends, VQ tokenizers,
generation.

    from hermesflow_fast.model import UnifiedTransformer, ModelConfig, Layout, Vocabulary, OmniMask
"""

from hermesflow_fast.model.config import ModelConfig
from hermesflow_fast.model.layout import IGNORE_INDEX, Layout, Sequences, Target, Vocabulary
from hermesflow_fast.model.masks import OmniMask
from hermesflow_fast.model.transformer import KVCache, UnifiedTransformer

__all__ = ["IGNORE_INDEX", "KVCache", "Layout", "ModelConfig", "OmniMask", "Sequences", "Target",
           "UnifiedTransformer", "Vocabulary"]
