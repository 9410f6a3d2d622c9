"""LFQ (lookup-free quantization): the signs of C channels as one integer index, and back.

MAGVIT-v2's quantizer, the image tokenizer of Show-o and so of HermesFlow's image tokens. Over the last dim C of z:

    bit_c  = [z_c > 0]                  strict: +0, −0 and NaN all give 0
    index  = Σ_c bit_c · 2^(C−1−c)       channel 0 is the most significant bit, 1 ≤ C ≤ 62
    code_c = +1 if bit_c else −1        so lfq_codes(lfq_quantize(z), C) is sign(z) with 0 ↦ −1

    lfq_quantize(z)                     z (..., C) float32/float64/float16/bfloat16     ->  (...) int64
    lfq_codes(indices, bits, dtype)     indices (...) any integer dtype, in [0, 2^bits)  ->  (..., bits) of ±1

Fast path: ``torch.ops.hermesflow_fast.lfq_quantize`` / ``lfq_codes`` from the C++/CUDA extension (csrc/), whenever
it was built with a kernel for the tensor's device. Otherwise the plain-torch twin in ``ops/reference.py`` runs and
the fallback is said once, with how to build the extension. Both paths give the same bits for every input, strided
ones included. The native ops have Meta kernels, so ``torch.compile(fullgraph=True)`` keeps each as one graph node.

    python -m pytest -q tests/csrc/test_lfq.py
"""

from __future__ import annotations

import operator

import torch

from hermesflow_fast import _native
from hermesflow_fast._notice import say_once
from hermesflow_fast.ops import reference

__all__ = ["MAX_BITS", "lfq_codes", "lfq_quantize"]

# Indices are int64 and their exclusive bound 2^bits must be one too (see csrc/include/lfq.h).
MAX_BITS = 62

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_INT_DTYPES = (
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64,
)


def lfq_quantize(z: torch.Tensor) -> torch.Tensor:
    """Index of the sign pattern of each position: ``Σ_c [z_c > 0] · 2^(C−1−c)``, channel 0 most significant.

    Args:
        z: (..., C) float32, float64, float16 or bfloat16, any strides, with 1 ≤ C ≤ 62. Leading dims may be empty.

    Returns:
        (...) int64 indices in [0, 2^C). +0, −0 and NaN channels give bit 0 (``z > 0`` is false for them).

    Raises:
        ValueError: z is not one of the floating dtypes above, has no dims, or C is outside [1, 62].
    """
    if z.dtype not in _FLOAT_DTYPES or z.dim() < 1:
        raise ValueError(
            "lfq_quantize: z must be a floating tensor (float32, float64, float16 or bfloat16) with at least 1 dim, "
            f"got dtype={z.dtype} shape={tuple(z.shape)}"
        )
    if not 1 <= z.shape[-1] <= MAX_BITS:
        raise ValueError(
            f"lfq_quantize: z's last dim C (the bits of each index) must lie in [1, {MAX_BITS}], "
            f"got z of shape {tuple(z.shape)}"
        )
    if _native.has_kernel(z.device):
        return torch.ops.hermesflow_fast.lfq_quantize(z)
    say_once(f"lfq-fallback-{z.device.type}", _fallback_message(z.device))
    return reference.lfq_quantize(z)


def lfq_codes(indices: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """±1 code vector of each index, the inverse of :func:`lfq_quantize` on the signs.

    ``code_c = 2·bit_(bits−1−c)(index) − 1``: channel 0 reads the most significant of the ``bits`` bits.

    Args:
        indices: (...) of any integer dtype (uint8 … int64, uint16/32/64), any strides. Leading dims may be empty.
        bits: C, the number of channels, in [1, 62].
        dtype: dtype of the result (±1 is exact in every dtype).

    Returns:
        (..., bits) of ±1, channel 0 from the most significant bit.

    Raises:
        ValueError: indices is not an integer tensor; bits is outside [1, 62]; on CPU, an index is outside
            [0, 2^bits). On CUDA the values are not checked (that would cost a host sync): an out-of-range index
            yields the code of its low ``bits`` bits, as the reference does.
    """
    if indices.dtype not in _INT_DTYPES:
        raise ValueError(
            f"lfq_codes: indices must be an integer tensor, got dtype={indices.dtype} shape={tuple(indices.shape)}"
        )
    try:
        bits = operator.index(bits)
    except TypeError:
        raise ValueError(f"lfq_codes: bits must be an int in [1, {MAX_BITS}], got {bits!r}") from None
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(
            f"lfq_codes: bits must lie in [1, {MAX_BITS}], got bits={bits} for indices of shape {tuple(indices.shape)}"
        )
    if _native.has_kernel(indices.device):
        codes = torch.ops.hermesflow_fast.lfq_codes(indices, bits)  # (..., bits) float32; CPU checks the range
        return codes if dtype == torch.float32 else codes.to(dtype)
    _check_index_range(indices, bits)
    say_once(f"lfq-fallback-{indices.device.type}", _fallback_message(indices.device))
    return reference.lfq_codes(indices, bits, dtype)


# ---------------------------------------------------------------------------------------------------------------------
# The fallback path
# ---------------------------------------------------------------------------------------------------------------------


def _check_index_range(indices: torch.Tensor, bits: int) -> None:
    """On CPU, outside torch.compile (a data-dependent check would break the graph): every index in [0, 2^bits)."""
    if indices.device.type != "cpu" or indices.numel() == 0 or torch.compiler.is_compiling():
        return
    low, high = torch.aminmax(indices.to(torch.int64))  # uint64 above 2^63 wraps negative: still reported
    if low < 0 or high >= 2**bits:
        raise ValueError(
            f"lfq_codes: indices must lie in [0, 2^bits) = [0, {2**bits}) for bits={bits}, "
            f"got min={int(low)} max={int(high)} in indices of shape {tuple(indices.shape)}"
        )


def _fallback_message(device: torch.device) -> str:
    if not _native.has_extension():
        why = f"hermesflow_fast._C did not load ({_native.extension_error()})"
    else:
        why = f"hermesflow_fast._C has no {device.type} kernels (built with: {_native.build_info()})"
    where = " on a machine with nvcc and a CUDA build of torch" if device.type == "cuda" else ""
    hint = f"For the fast path, {_native.BUILD_HINT}{where}."
    return f"LFQ ops on {device.type} run the plain-torch reference: {why}. {hint}"
