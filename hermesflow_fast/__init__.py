"""hermesflow_fast: fast, correct HermesFlow Pair-DPO training for unified multimodal models."""

__version__ = "0.1.0"
