"""LFQ: the native ops of hermesflow_fast._C (csrc/) and their entry points in hermesflow_fast/ops/lfq.py, held to
the plain-torch twin in hermesflow_fast/ops/reference.py bit for bit.

    .venv/bin/python -m pytest -q tests/csrc/test_lfq.py

Most tests run twice, through the native op ("native", skipped when the extension is not built) and through the
reference fallback with the extension forced off ("fallback"); both must give the reference's bits.
"""

from __future__ import annotations

import pytest
import torch

from hermesflow_fast import _native, _notice
from hermesflow_fast._notice import FallbackWarning
from hermesflow_fast.ops import lfq, reference

pytestmark = pytest.mark.filterwarnings("ignore::hermesflow_fast._notice.FallbackWarning")

needs_ext = pytest.mark.skipif(
    not _native.has_extension(), reason=f"hermesflow_fast._C is not built: {_native.extension_error()}"
)

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
INT_DTYPES = [
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64,
]
# (B, T, C) realistic (Show-o: 18-bit LFQ over 16x16 tokens), then odd, single-channel, widest, empty and 1-D shapes.
# (16, 1024, 18) is past the CPU kernel's grain, so it runs on several threads.
SHAPES = [(4, 256, 18), (16, 1024, 18), (3, 47, 13), (5, 1), (7, 62), (13,), (0, 13), (2, 0, 7)]


@pytest.fixture(params=["native", "fallback"])
def path(request, monkeypatch):
    if request.param == "native":
        if not _native.has_extension():
            pytest.skip(f"hermesflow_fast._C is not built: {_native.extension_error()}")
    else:
        monkeypatch.setattr(_native, "has_kernel", lambda device: False)
    return request.param


def signed_values(shape, dtype: torch.dtype) -> torch.Tensor:
    """randn with exact +0 and −0 sprinkled in (about 5% each), in `dtype`."""
    z = torch.randn(shape, dtype=torch.float64)
    pick = torch.rand(shape)
    z[pick < 0.05] = 0.0
    z[pick > 0.95] = -0.0
    return z.to(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Equality with the reference
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_quantize_matches_reference(path, shape, dtype):
    z = signed_values(shape, dtype)
    got = lfq.lfq_quantize(z)
    assert got.dtype == torch.int64 and got.shape == shape[:-1]
    torch.testing.assert_close(got, reference.lfq_quantize(z), rtol=0, atol=0)


def test_zero_negative_zero_nan_and_tiny_values(path):
    # bit = [z > 0]: ±0, NaN and −inf give 0; +inf and the tiniest positives give 1 in every dtype.
    special = [0.0, -0.0, float("nan"), float("-inf"), float("inf"), -1.0, 1.0]
    for dtype in FLOAT_DTYPES:
        tiny = torch.finfo(dtype).smallest_normal / 4  # a subnormal of the dtype: still > 0
        z = torch.tensor([*special, tiny], dtype=dtype)  # (8,): bits 0 0 0 0 1 0 1 1
        assert lfq.lfq_quantize(z).item() == 0b00001011, dtype
    # A float64 below float32's range must not be narrowed to +0 on its way to the compare.
    assert lfq.lfq_quantize(torch.tensor([1e-300, -1e-300], dtype=torch.float64)).item() == 0b10


@pytest.mark.parametrize("index_dtype", INT_DTYPES, ids=str)
def test_codes_match_reference(path, index_dtype):
    bits = 7 if index_dtype in (torch.uint8, torch.int8) else 13
    indices = torch.randint(0, 2**bits, (3, 47), dtype=torch.int64).to(index_dtype)
    got = lfq.lfq_codes(indices, bits)
    assert got.dtype == torch.float32 and got.shape == (3, 47, bits)
    torch.testing.assert_close(got, reference.lfq_codes(indices, bits), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_codes_dtype(path, dtype):
    indices = torch.randint(0, 2**18, (4, 256))
    got = lfq.lfq_codes(indices, 18, dtype=dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got, reference.lfq_codes(indices, 18, dtype), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(0,), (2, 0), (0, 5)], ids=str)
def test_codes_empty(path, shape):
    assert lfq.lfq_codes(torch.empty(shape, dtype=torch.int64), 9).shape == (*shape, 9)


@pytest.mark.parametrize("bits", [1, 2, 13, 18, 62])
def test_round_trip(path, bits):
    indices = torch.randint(0, 2**bits, (5, 129), dtype=torch.int64)
    codes = lfq.lfq_codes(indices, bits)  # (5, 129, bits)
    torch.testing.assert_close(lfq.lfq_quantize(codes), indices, rtol=0, atol=0)


def test_non_contiguous(path):
    base = signed_values((13, 47, 3), torch.float32)
    views = {
        "permuted (channel stride 141)": base.permute(2, 1, 0),  # (3, 47, 13)
        "sliced rows": base.permute(1, 0, 2)[::2],  # (24, 13, 3)
        "sliced channels": base[..., ::2],  # (13, 47, 2), channel stride 2
        "broadcast rows (stride 0)": base[0, 0].expand(9, 3),  # (9, 3)
    }
    for name, z in views.items():
        assert not z.is_contiguous(), name
        torch.testing.assert_close(lfq.lfq_quantize(z), reference.lfq_quantize(z), rtol=0, atol=0, msg=name)
    indices = torch.randint(0, 2**11, (6, 40))
    index_views = {"transposed": indices.t(), "sliced": indices[:, ::3], "broadcast": indices[:1].expand(4, 40)}
    for name, i in index_views.items():
        assert not i.is_contiguous(), name
        torch.testing.assert_close(lfq.lfq_codes(i, 11), reference.lfq_codes(i, 11), rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs: ValueError naming the argument, on both paths
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("z", "match"),
    [
        (torch.zeros(3, 4, dtype=torch.int32), "z must be a floating tensor"),
        (torch.zeros(3, 4, dtype=torch.complex64), "z must be a floating tensor"),
        (torch.tensor(1.0), "z must be a floating tensor .* at least 1 dim"),
        (torch.zeros(3, 0), r"z's last dim C .* shape \(3, 0\)"),
        (torch.zeros(2, 63), r"z's last dim C .* \[1, 62\]"),
    ],
    ids=["int", "complex", "0-dim", "C=0", "C=63"],
)
def test_quantize_bad_input(path, z, match):
    with pytest.raises(ValueError, match=f"lfq_quantize: {match}"):
        lfq.lfq_quantize(z)


@pytest.mark.parametrize(
    ("indices", "bits", "match"),
    [
        (torch.zeros(3, dtype=torch.float32), 4, "indices must be an integer tensor, got dtype=torch.float32"),
        (torch.zeros(3, dtype=torch.bool), 4, "indices must be an integer tensor"),
        (torch.zeros(3, dtype=torch.int64), 0, r"bits must lie in \[1, 62\], got bits=0"),
        (torch.zeros(3, dtype=torch.int64), 63, r"bits must lie in \[1, 62\], got bits=63"),
        (torch.zeros(3, dtype=torch.int64), 2.0, "bits must be an int"),
        (torch.tensor([0, 255, 256]), 8, r"indices must lie in \[0, 2\^bits\) = \[0, 256\)"),
        (torch.tensor([3, -1]), 8, r"indices must lie in \[0, 2\^bits\)"),
        (torch.tensor([70], dtype=torch.uint8), 6, r"indices must lie in \[0, 2\^bits\) = \[0, 64\)"),
    ],
    ids=["float", "bool", "bits=0", "bits=63", "bits=float", "too big", "negative", "uint8 too big"],
)
def test_codes_bad_input(path, indices, bits, match):
    with pytest.raises(ValueError, match=f"lfq_codes: {match}"):
        lfq.lfq_codes(indices, bits)


@needs_ext
def test_native_checks_name_the_argument():
    # The C++ checks (csrc/lfq.cpp) stand on their own, for callers of torch.ops.hermesflow_fast.* directly.
    ops = torch.ops.hermesflow_fast
    with pytest.raises(ValueError, match=r"lfq_quantize: z must be a floating tensor .* dtype=Long shape=\[2, 3\]"):
        ops.lfq_quantize(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"lfq_quantize: z's last dim C .* shape \[4, 0\]"):
        ops.lfq_quantize(torch.zeros(4, 0))
    with pytest.raises(ValueError, match=r"lfq_codes: indices must be an integer tensor, got dtype=Float"):
        ops.lfq_codes(torch.zeros(3), 4)
    with pytest.raises(ValueError, match=r"lfq_codes: bits must lie in \[1, 62\], got bits=63"):
        ops.lfq_codes(torch.zeros(3, dtype=torch.int64), 63)
    # Out of range: the lowest bad flat position is named, even when threads found others first.
    indices = torch.randint(0, 2**10, (16, 4096))
    indices[15, 7] = 2**10
    indices[3, 100] = -5
    with pytest.raises(ValueError, match=r"got -5 at flat position 12388 of indices with shape \[16, 4096\]"):
        ops.lfq_codes(indices, 10)


# ---------------------------------------------------------------------------------------------------------------------
# The fallback, and what the extension says about itself
# ---------------------------------------------------------------------------------------------------------------------


def test_fallback_says_how_to_get_the_fast_path(monkeypatch):
    monkeypatch.setattr(_native, "has_kernel", lambda device: False)
    monkeypatch.setattr(_notice, "_said", set())
    z = signed_values((2, 5, 9), torch.float32)
    with pytest.warns(FallbackWarning, match="pip install --no-build-isolation -e"):
        got = lfq.lfq_quantize(z)
    torch.testing.assert_close(got, reference.lfq_quantize(z), rtol=0, atol=0)


def test_native_state_is_consistent():
    assert _native.has_extension() == (_native.extension_error() is None)
    assert _native.has_kernel(torch.device("cpu")) == _native.has_extension()
    if _native.has_extension():
        assert torch.ops.hermesflow_fast.lfq_quantize.default is not None
        # The build's own word on CUDA must match what is registered with the dispatcher.
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("hermesflow_fast::lfq_quantize", "CUDA")
        assert _native.has_cuda_kernels() == has_cuda
        assert "built against torch" in _native.build_info()
    else:
        assert not _native.has_cuda_kernels()
        assert "pip install" in _native.build_info()


# ---------------------------------------------------------------------------------------------------------------------
# torch.library and torch.compile
# ---------------------------------------------------------------------------------------------------------------------


@needs_ext
def test_opcheck():
    ops = torch.ops.hermesflow_fast
    for z in (torch.randn(3, 47, 13), torch.randn(5, 1, dtype=torch.float64), torch.randn(13, 4).t()):
        torch.library.opcheck(ops.lfq_quantize.default, (z,))
    for indices, bits in ((torch.randint(0, 2**13, (3, 47)), 13), (torch.randint(0, 2, (5,), dtype=torch.int32), 1)):
        torch.library.opcheck(ops.lfq_codes.default, (indices, bits))


@needs_ext
def test_meta_shapes():
    z = torch.empty(2, 7, 18, device="meta", dtype=torch.bfloat16)
    out = torch.ops.hermesflow_fast.lfq_quantize(z)
    assert out.shape == (2, 7) and out.dtype == torch.int64 and out.device.type == "meta"
    codes = torch.ops.hermesflow_fast.lfq_codes(torch.empty(2, 7, device="meta", dtype=torch.int32), 18)
    assert codes.shape == (2, 7, 18) and codes.dtype == torch.float32


@needs_ext
def test_compile_fullgraph():  # ~4 s on 2 CPU cores
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, dynamic=True)
    def requantize(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        indices = lfq.lfq_quantize(z)  # (B, T)
        return indices, lfq.lfq_codes(indices, z.shape[-1], dtype=z.dtype)  # (B, T, C)

    for shape in ((2, 16, 18), (3, 5, 18)):
        z = signed_values(shape, torch.float32)
        indices, codes = requantize(z)
        torch.testing.assert_close(indices, reference.lfq_quantize(z), rtol=0, atol=0)
        torch.testing.assert_close(codes, reference.lfq_codes(indices, shape[-1]), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_cuda_matches_reference(dtype):
    z = signed_values((16, 1024, 18), dtype).cuda()
    z[0, 0, 0] = float("nan")
    indices = lfq.lfq_quantize(z)
    torch.testing.assert_close(indices, reference.lfq_quantize(z), rtol=0, atol=0)
    torch.testing.assert_close(lfq.lfq_codes(indices, 18), reference.lfq_codes(indices, 18), rtol=0, atol=0)
    strided = z.transpose(0, 1)[::3]  # (342, 16, 18), non-contiguous rows
    torch.testing.assert_close(lfq.lfq_quantize(strided), reference.lfq_quantize(strided), rtol=0, atol=0)
    narrow = torch.randint(0, 2**9, (40, 6), device="cuda", dtype=torch.int32).t()  # (6, 40), strided int32
    torch.testing.assert_close(lfq.lfq_codes(narrow, 9), reference.lfq_codes(narrow, 9), rtol=0, atol=0)
    if _native.has_cuda_kernels():  # the native op itself, not a fallback
        ops = torch.ops.hermesflow_fast
        torch.testing.assert_close(ops.lfq_quantize(z), reference.lfq_quantize(z), rtol=0, atol=0)
        out_of_range = torch.tensor([2**9 + 5, -1], device="cuda")  # unchecked on CUDA: low bits, as the reference
        torch.testing.assert_close(ops.lfq_codes(out_of_range, 9), reference.lfq_codes(out_of_range, 9))
