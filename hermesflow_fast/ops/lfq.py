from hermesflow_fast.ops.reference import lfq_codes, lfq_quantize  # placeholder
__all__ = ["lfq_codes", "lfq_quantize"]
