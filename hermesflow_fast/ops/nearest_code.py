"""Nearest code (vector quantization): the index of the closest codebook row of each input row, by squared L2.

    nearest_code(x, codebook)     x (N, D), codebook (K, D), K ≥ 1, one floating dtype  ->  (N,) int64

    index_n = argmin_k ||c_k||² − 2 ⟨x_n, c_k⟩  (= argmin_k ||x_n − c_k||²)   the lowest k on ties

The (N, K) distance matrix is never materialized: the native kernels keep one running (min, argmin) per row while
they sweep the codebook in cache-sized tiles, so the extra memory is O(N) (plus a packed copy of the codebook on
CPU). float32, float64, float16 and bfloat16 inputs are accepted; the scores are computed in float32 for the half
types and float32 itself, in float64 for float64. A NaN score counts as the minimum, as in ``torch.argmin``.

Fast path: ``torch.ops.hermesflow_fast.nearest_code`` from the C++/CUDA extension (csrc/nearest_code.cpp), whenever
it was built with a kernel for the tensor's device. Otherwise the plain-torch twin ``reference.nearest_code`` runs
(chunked over rows, so it never holds the full matrix either) and the fallback is said once. Both paths compute the
same score (see the reference's docstring), so where the scores are exact they agree index for index, ties
included. The native op has a Meta kernel, so ``torch.compile(fullgraph=True)`` keeps it as one graph node.

    python -m pytest -q tests/csrc/test_nearest_code.py
"""

from __future__ import annotations

import torch

from hermesflow_fast import _native
from hermesflow_fast._notice import say_once
from hermesflow_fast.ops import reference

__all__ = ["nearest_code"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# The op is registered when the extension loaded and was built from sources that have it (an extension built before
# csrc/nearest_code.cpp existed loads fine but lacks the op: the reference runs then, and says why).
_HAS_OP = _native.has_extension() and hasattr(torch.ops.hermesflow_fast, "nearest_code")


def nearest_code(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row of each row of ``x`` by squared L2 distance, the lowest index on ties.

    Args:
        x: (N, D) float32, float64, float16 or bfloat16, any strides. N may be 0.
        codebook: (K, D) with K ≥ 1, the same dtype and device as ``x``, any strides.

    Returns:
        (N,) int64 on ``x``'s device: ``argmin_k ||c_k||² − 2 ⟨x_n, c_k⟩``, the first k on ties.

    Raises:
        ValueError: x or codebook is not a 2-D tensor of one of the floating dtypes above; their D, dtype or device
            differ; the codebook has no rows.
    """
    _check_args(x, codebook)
    if _HAS_OP and _native.has_kernel(x.device):
        return torch.ops.hermesflow_fast.nearest_code(x, codebook)
    say_once(f"nearest-code-fallback-{x.device.type}", _fallback_message(x.device))
    return reference.nearest_code(x, codebook)


def _check_args(x: torch.Tensor, codebook: torch.Tensor) -> None:
    for name, t, dims in (("x", x, "(N, D)"), ("codebook", codebook, "(K, D)")):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"nearest_code: {name} must be a tensor of shape {dims}, got {type(t).__name__}")
        if t.dim() != 2 or t.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"nearest_code: {name} must be a 2-D {dims} floating tensor (float32, float64, float16 or bfloat16), "
                f"got dtype={t.dtype} shape={tuple(t.shape)}"
            )
    if x.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"nearest_code: x (N, D) and codebook (K, D) must have the same D, got x of shape {tuple(x.shape)} and "
            f"codebook of shape {tuple(codebook.shape)}"
        )
    if x.dtype != codebook.dtype:
        raise ValueError(
            f"nearest_code: x and codebook must have the same dtype, got x {x.dtype} and codebook {codebook.dtype}; "
            "cast one of them"
        )
    if x.device != codebook.device:
        raise ValueError(
            f"nearest_code: x and codebook must be on the same device, got x on {x.device} and codebook on "
            f"{codebook.device}"
        )
    if codebook.shape[0] < 1:
        raise ValueError(f"nearest_code: codebook must have at least 1 row (K ≥ 1), got shape {tuple(codebook.shape)}")


def _fallback_message(device: torch.device) -> str:
    if not _native.has_extension():
        why = f"hermesflow_fast._C did not load ({_native.extension_error()})"
    elif not _HAS_OP:
        why = "hermesflow_fast._C was built before nearest_code existed (rebuild it)"
    else:
        why = f"hermesflow_fast._C has no {device.type} kernels (built with: {_native.build_info()})"
    where = " on a machine with nvcc and a CUDA build of torch" if device.type == "cuda" else ""
    hint = f"For the fast path, {_native.BUILD_HINT}{where}."
    return f"nearest_code on {device.type} runs the plain-torch reference (chunked over rows): {why}. {hint}"
