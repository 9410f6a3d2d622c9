"""Public fused ops: import what you need, e.g. ``from hermesflow_fast.ops import linear_logprobs``.

| op | functional | module | plain-torch twin (ops/reference.py) |
|---|---|---|---|
| per-token log-probs of a linear head | ``linear_logprobs`` | ``LinearLogprobs`` | ``reference.linear_logprobs`` |
| DPO loss, per pair | ``dpo_loss`` | | ``reference.dpo_per_pair_losses`` |
| HermesFlow Pair-DPO | ``pair_dpo_loss`` | | ``reference.pair_dpo_loss`` |
| head + DPO, policy + ref | ``fused_linear_dpo_loss`` | ``FusedLinearDPOLoss`` | ``reference.fused_linear_dpo`` |
| the same, as an autograd Function | ``FusedLinearDPOFunction.apply`` | | ``reference.fused_linear_dpo`` |
| LFQ quantize / codes | ``lfq_quantize``, ``lfq_codes`` | | ``reference.lfq_quantize``, ``reference.lfq_codes`` |
| nearest code (VQ), squared L2 | ``nearest_code`` | | ``reference.nearest_code`` |
"""

from hermesflow_fast.ops.dpo import DPO_LOSS_TYPES, dpo_loss, dpo_losses, pair_dpo_loss
from hermesflow_fast.ops.fused_dpo import FusedLinearDPOFunction, FusedLinearDPOLoss, fused_linear_dpo_loss
from hermesflow_fast.ops.lfq import lfq_codes, lfq_quantize
from hermesflow_fast.ops.logprobs import LinearLogprobs, linear_logprobs
from hermesflow_fast.ops.nearest_code import nearest_code

__all__ = [
    "DPO_LOSS_TYPES",
    "FusedLinearDPOFunction",
    "FusedLinearDPOLoss",
    "LinearLogprobs",
    "dpo_loss",
    "dpo_losses",
    "fused_linear_dpo_loss",
    "lfq_codes",
    "lfq_quantize",
    "linear_logprobs",
    "nearest_code",
    "pair_dpo_loss",
]
