"""nearest_code: the native op of hermesflow_fast._C (csrc/nearest_code.cpp, csrc/cpu/, csrc/cuda/) and its entry point
in hermesflow_fast/ops/nearest_code.py, held to the plain-torch twin reference.nearest_code.

    .venv/bin/python -m pytest -q tests/csrc/test_nearest_code.py

Most tests run twice, through the native op ("native", skipped when the extension is not built) and through the
reference fallback with the extension forced off ("fallback"). On integer-valued data every score is exact, so both
paths must return the exact answer, the lowest index among equal distances; on random data they may differ only
between codes whose distances lie within rounding of each other.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hermesflow_fast import _native, _notice
from hermesflow_fast._notice import FallbackWarning
from hermesflow_fast.ops import nearest_code, reference

# The package exports the function under the module's own name, so the module is fetched from sys.modules.
nc_module = importlib.import_module("hermesflow_fast.ops.nearest_code")

pytestmark = pytest.mark.filterwarnings("ignore::hermesflow_fast._notice.FallbackWarning")

has_op = nc_module._HAS_OP
needs_op = pytest.mark.skipif(not has_op, reason=f"hermesflow_fast._C lacks nearest_code: {_native.build_info()}")

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(params=["native", "fallback"])
def path(request, monkeypatch):
    if request.param == "native":
        if not has_op:
            pytest.skip(f"hermesflow_fast._C lacks nearest_code: {_native.build_info()}")
    else:
        monkeypatch.setattr(_native, "has_kernel", lambda device: False)
    return request.param


def exact_nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The true answer on integer-valued inputs: int64 squared distances (on the CPU), the first minimum."""
    xi, ci = x.cpu().to(torch.int64), codebook.cpu().to(torch.int64)
    dist = (xi * xi).sum(1, keepdim=True) - 2 * xi @ ci.t() + (ci * ci).sum(1)  # (N, K), exact
    return dist.argmin(1).to(x.device)


def sq_dist(x: torch.Tensor, codebook: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """||x_n − c_index_n||² in float64."""
    return ((x.double() - codebook.double()[index]) ** 2).sum(1)


def assert_nearest(x: torch.Tensor, codebook: torch.Tensor, got: torch.Tensor) -> None:
    """got is int64 on x's device and, row by row, the reference's index or a code at the same distance up to
    float32 rounding of the scores (which are computed in float32 for every input dtype but float64)."""
    assert got.dtype == torch.int64 and got.shape == (x.shape[0],) and got.device == x.device
    want = reference.nearest_code(x, codebook)
    if torch.equal(got, want):
        return
    xf, cf = x.double(), codebook.double()
    gap = sq_dist(xf, cf, got) - sq_dist(xf, cf, want)  # (N,), ≥ 0 up to rounding when got is a near-tie
    scale = (xf * xf).sum(1) + (cf * cf).sum(1).max()
    eps = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
    bad = gap.abs() > 64 * eps * x.shape[1] * scale
    assert not bad.any(), f"{int(bad.sum())} rows off, e.g. row {int(bad.nonzero()[0, 0])}"
    assert int((got != want).sum()) <= max(1, x.shape[0] // 100), "near-ties should be rare on random data"


# ---------------------------------------------------------------------------------------------------------------------
# Agreement with the reference, and exact answers
# ---------------------------------------------------------------------------------------------------------------------


# (N, K, D): Show-o's 8192-code LFQ-sized books and VQ-GAN-like D = 8, 13 (odd), 256; K = 1; N off the SIMD widths.
SHAPES = [(300, 512, 8), (257, 8192, 8), (130, 8192, 13), (67, 512, 256), (33, 1, 256), (1, 7, 13), (70, 5, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(path, shape):
    n, k, d = shape
    x, codebook = torch.randn(n, d), torch.randn(k, d)
    assert_nearest(x, codebook, nearest_code(x, codebook))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_dtypes(path, dtype):
    x, codebook = torch.randn(200, 13).to(dtype), torch.randn(700, 13).to(dtype)
    got = nearest_code(x, codebook)
    assert got.dtype == torch.int64
    assert_nearest(x, codebook, got)


def test_non_contiguous(path):
    base = torch.randn(13, 300)
    book = torch.randn(16, 600)
    views = {
        "transposed x and codebook": (base.t(), book.t()[:, :13]),  # (300, 13) with stride (1, 300)
        "sliced rows": (base.t()[::3], book.t()[::2, 3:16]),  # every 3rd row; every 2nd code, offset dims
        "sliced dims": (base[::2].t(), book[:7].t()),  # (300, 7) with dim stride 600
        "broadcast rows (stride 0)": (base[:, 0].expand(40, 13), book.t()[:, :13]),
    }
    for name, (x, codebook) in views.items():
        assert not x.is_contiguous(), name
        got = nearest_code(x, codebook)
        torch.testing.assert_close(got, nearest_code(x.contiguous(), codebook.contiguous()), rtol=0, atol=0, msg=name)
        assert_nearest(x, codebook, got)


@pytest.mark.parametrize(
    ("n", "k", "d"),
    [(500, 600, 13), (200, 8195, 8), (100, 300, 256), (90, 40, 1)],
    ids=["odd", "two tiles + tail", "wide", "D=1"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_exact_ties_go_to_the_lowest_index(path, n, k, d, dtype):
    # Small integers: every score is exact in float32, so the answer is exact, and duplicate codes tie exactly.
    codebook = torch.randint(-4, 5, (k, d))
    codebook[k - 1] = codebook[0]  # a duplicate in the last tile (and the code tail), of the very first code
    codebook[k // 2 :: 7] = codebook[3]  # many duplicates of code 3, across tiles
    x = torch.cat([torch.randint(-4, 5, (n - 4, d)), codebook[[0, 3, k - 1, k // 2]]])  # rows sitting on codes
    got = nearest_code(x.to(dtype), codebook.to(dtype))
    want = exact_nearest(x, codebook)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if d > 1:  # (with D = 1 and 9 values, code 3 most likely repeats an earlier one)
        assert got[-4:].tolist() == [0, 3, 0, 3]


def test_all_codes_equal(path):
    x, codebook = torch.randn(64, 8), torch.randn(1, 8).expand(1000, 8)
    assert nearest_code(x, codebook).eq(0).all()
    assert nearest_code(torch.randn(20, 0), torch.randn(9, 0)).eq(0).all()  # D = 0: every distance is 0


def test_nan_as_torch_argmin(path):
    # A NaN score is the minimum and the first one wins, as in torch.argmin: a NaN row gets 0, a NaN code wins
    # every other row.
    x = torch.randint(-3, 4, (50, 6)).float()
    codebook = torch.randint(-3, 4, (30, 6)).float()
    x[7, 2] = float("nan")
    codebook[11, 0] = codebook[20, 5] = float("nan")
    got = nearest_code(x, codebook)
    torch.testing.assert_close(got, reference.nearest_code(x, codebook), rtol=0, atol=0)
    assert got[7] == 0 and got.tolist().count(11) == 49


def test_empty_and_result(path):
    got = nearest_code(torch.empty(0, 13), torch.randn(5, 13))
    assert got.shape == (0,) and got.dtype == torch.int64
    got = nearest_code(torch.randn(3, 4), torch.randn(2, 4))
    assert got.shape == (3,) and got.dtype == torch.int64 and got.device.type == "cpu"


def test_reference_chunks_agree():
    x, codebook = torch.randn(100, 8), torch.randn(300, 8)
    whole = reference.nearest_code(x, codebook)
    for rows in (1, 7, 100, 1000):
        torch.testing.assert_close(reference.nearest_code(x, codebook, chunk_rows=rows), whole, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs: ValueError naming the argument, on both paths
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "codebook", "match"),
    [
        (torch.zeros(5), torch.zeros(3, 5), r"x must be a 2-D \(N, D\) floating tensor .* shape=\(5,\)"),
        (torch.zeros(4, 5, dtype=torch.int32), torch.zeros(3, 5), r"x must be a 2-D .* dtype=torch.int32"),
        (torch.zeros(4, 5), torch.zeros(2, 3, 5), r"codebook must be a 2-D \(K, D\) .* shape=\(2, 3, 5\)"),
        (torch.zeros(4, 5), torch.zeros(3, 5, dtype=torch.complex64), "codebook must be a 2-D"),
        (torch.zeros(4, 5), torch.zeros(3, 6), r"the same D, got x of shape \(4, 5\) and codebook of shape \(3, 6\)"),
        (torch.zeros(4, 5), torch.zeros(3, 5, dtype=torch.float64), "the same dtype, got x torch.float32 and codebook"),
        (torch.zeros(4, 5), torch.zeros(3, 5, device="meta"), "the same device, got x on cpu and codebook on meta"),
        (torch.zeros(4, 5), torch.zeros(0, 5), r"codebook must have at least 1 row .* \(0, 5\)"),
    ],
    ids=["x 1-D", "x int", "codebook 3-D", "codebook complex", "D", "dtype", "device", "K=0"],
)
def test_bad_input(path, x, codebook, match):
    with pytest.raises(ValueError, match=f"nearest_code: (.* )?{match}"):
        nearest_code(x, codebook)


@needs_op
def test_native_checks_name_the_argument():
    # The C++ checks (csrc/nearest_code.cpp) stand on their own, for callers of torch.ops.hermesflow_fast.* directly.
    op = torch.ops.hermesflow_fast.nearest_code
    cases = [
        ((torch.zeros(5), torch.zeros(3, 5)), r"x must be a 2-D \(N, D\) floating tensor .* shape=\[5\]"),
        ((torch.zeros(4, 5, dtype=torch.int64), torch.zeros(3, 5)), "x must be a 2-D .* dtype=Long"),
        ((torch.zeros(4, 5), torch.zeros(3)), r"codebook must be a 2-D \(K, D\) .* shape=\[3\]"),
        ((torch.zeros(4, 5), torch.zeros(3, 6)), r"the same D, got x of shape \[4, 5\] and codebook of shape \[3, 6\]"),
        ((torch.zeros(4, 5), torch.zeros(3, 5).half()), "the same dtype, got x Float and codebook Half"),
        ((torch.zeros(4, 5), torch.zeros(0, 5)), r"codebook must have between 1 and 2147483647 rows"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=f"nearest_code: (.* )?{match}"):
            op(*args)


# ---------------------------------------------------------------------------------------------------------------------
# The fallback, the baseline-ISA kernel, torch.library and torch.compile
# ---------------------------------------------------------------------------------------------------------------------


def test_fallback_says_how_to_get_the_fast_path(monkeypatch):
    monkeypatch.setattr(_native, "has_kernel", lambda device: False)
    monkeypatch.setattr(_notice, "_said", set())
    x, codebook = torch.randn(9, 4), torch.randn(5, 4)
    with pytest.warns(FallbackWarning, match="nearest_code on cpu runs the plain-torch reference"):
        got = nearest_code(x, codebook)
    torch.testing.assert_close(got, reference.nearest_code(x, codebook), rtol=0, atol=0)


@needs_op
def test_baseline_isa_kernel():  # ~3 s: a fresh process, since the ISA is picked once per process
    script = textwrap.dedent(
        """
        import torch
        from hermesflow_fast.ops import reference
        op = torch.ops.hermesflow_fast.nearest_code
        torch.manual_seed(0)
        for dtype in (torch.float32, torch.float64):
            book = torch.randint(-4, 5, (4101, 13)).to(dtype)
            book[4100] = book[1]
            x = torch.cat([torch.randint(-4, 5, (97, 13)).to(dtype), book[[1, 4100]]])
            assert torch.equal(op(x, book), reference.nearest_code(x, book)), dtype
            x, book = torch.randn(200, 8, dtype=dtype), torch.randn(600, 8, dtype=dtype)
            assert (op(x, book) != reference.nearest_code(x, book)).sum() <= 1, dtype
        print("ok")
        """
    )
    env = dict(os.environ, HFF_CPU_ISA="generic")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@needs_op
def test_opcheck():
    op = torch.ops.hermesflow_fast.nearest_code.default
    cases = [
        (torch.randn(37, 13), torch.randn(70, 13)),
        (torch.randn(13, 20, dtype=torch.float64).t(), torch.randn(3, 13, dtype=torch.float64)),
        (torch.randn(5, 8).bfloat16(), torch.randn(9, 8).bfloat16()),
        (torch.randn(0, 4), torch.randn(2, 4)),
    ]
    for x, codebook in cases:
        torch.library.opcheck(op, (x, codebook))


@needs_op
def test_meta_shapes():
    out = torch.ops.hermesflow_fast.nearest_code(
        torch.empty(300, 13, device="meta", dtype=torch.float16), torch.empty(8192, 13, device="meta").half()
    )
    assert out.shape == (300,) and out.dtype == torch.int64 and out.device.type == "meta"


@needs_op
def test_compile_fullgraph():  # ~4 s on 2 CPU cores
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, dynamic=True)
    def quantize(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = nearest_code(z.flatten(0, 1), codebook).view(z.shape[:2])  # (B, T)
        return index, codebook[index]  # and the quantized vectors (B, T, D)

    codebook = torch.randn(512, 8)
    for shape in ((2, 16, 8), (3, 5, 8)):
        z = torch.randn(shape)
        index, quantized = quantize(z, codebook)
        want = reference.nearest_code(z.flatten(0, 1), codebook).view(shape[:2])
        torch.testing.assert_close(index, want, rtol=0, atol=0)
        torch.testing.assert_close(quantized, codebook[want], rtol=0, atol=0)


def test_native_state_is_consistent():
    assert has_op == (_native.has_extension() and hasattr(torch.ops.hermesflow_fast, "nearest_code"))
    if has_op:
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("hermesflow_fast::nearest_code", "CUDA")
        assert _native.has_cuda_kernels() == has_cuda


# ---------------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_cuda_matches_reference(dtype):
    for n, k, d in ((16384, 8192, 8), (1000, 16384, 13), (333, 512, 256), (5, 1, 3)):
        x, codebook = torch.randn(n, d, device="cuda").to(dtype), torch.randn(k, d, device="cuda").to(dtype)
        assert_nearest(x, codebook, nearest_code(x, codebook))
    strided = torch.randn(13, 700, device="cuda").to(dtype).t()[::2]  # (350, 13), non-contiguous
    codebook = torch.randn(26, 300, device="cuda").to(dtype).t()[:, ::2]  # (300, 13), non-contiguous
    assert_nearest(strided, codebook, nearest_code(strided, codebook))


@pytest.mark.gpu
def test_cuda_exact_ties_and_nan():
    codebook = torch.randint(-4, 5, (8195, 13), device="cuda")
    codebook[8194] = codebook[0]
    codebook[4000::7] = codebook[3]
    x = torch.cat([torch.randint(-4, 5, (1000, 13), device="cuda"), codebook[[0, 3, 8194]]])
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        got = nearest_code(x.to(dtype), codebook.to(dtype))
        torch.testing.assert_close(got, exact_nearest(x, codebook), rtol=0, atol=0)
    xf, cf = x.float(), codebook.float()
    xf[7, 2] = float("nan")
    cf[100, 0] = float("nan")
    torch.testing.assert_close(nearest_code(xf, cf), reference.nearest_code(xf, cf), rtol=0, atol=0)
    if _native.has_cuda_kernels():  # the native op itself, not a fallback
        got = torch.ops.hermesflow_fast.nearest_code(x.float(), codebook.float())
        torch.testing.assert_close(got, exact_nearest(x, codebook), rtol=0, atol=0)
