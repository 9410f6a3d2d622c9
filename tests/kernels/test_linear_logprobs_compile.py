"""Every kernel of kernels/linear_logprobs.py compiles for an H100 (sm_90) without a GPU: Triton's own ptxas turns
the TTGIR into a cubin, so type, layout and shape errors that the interpreter does not see show up on CPU.

    .venv/bin/python -m pytest -q tests/kernels/test_linear_logprobs_compile.py

The signatures mark pointers, H, strides and the padded scratch width divisible by 16, as a launch on real tensors
specializes them; with that, the owned mode's GEMM loops prefetch both operands (checked for bf16, the training
dtype: a regression there would be a slowdown no CPU test could otherwise catch).
"""

import os
import re

import pytest
from hermesflow_fast.kernels import linear_logprobs as K

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not K.HAS_TRITON, reason="triton is not installed"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles for CUDA, not the interpreter"),
]

I32, F32 = "i32", "*fp32"


def _signatures(dt: str) -> dict:
    p = f"*{dt}"
    return {
        "_fwd_kernel": {"x_ptr": p, "w_ptr": p, "b_ptr": p, "y_ptr": "*i64", "lse_part_ptr": F32, "tgt_part_ptr": F32,
                        "N": I32, "H": I32, "V": I32, "stride_x": I32, "stride_w": I32, "tiles_per_split": I32},
        "_bwd_kernel": {"x_ptr": p, "w_ptr": p, "b_ptr": p, "y_ptr": "*i64", "lse_ptr": F32, "g_ptr": F32,
                        "dx_ptr": F32, "dw_ptr": F32, "db_ptr": F32, "N": I32, "H": I32, "V": I32, "stride_x": I32,
                        "stride_w": I32, "ignore_index": "i64"},
        "_dz_kernel": {"x_ptr": p, "w_ptr": p, "b_ptr": p, "y_ptr": "*i64", "lse_ptr": F32, "g_ptr": F32, "dz_ptr": p,
                       "dbp_ptr": F32, "row0": I32, "n_rows": I32, "col0": I32, "n_cols": I32, "n_cols_pad": I32,
                       "H": I32, "stride_x": I32, "stride_w": I32, "stride_dz": I32, "stride_dbp": I32},
        "_dw_kernel": {"dz_ptr": p, "x_ptr": p, "g_ptr": F32, "finite_ptr": "*i32", "dw_ptr": p, "N": I32, "H": I32,
                       "col0": I32, "n_cols": I32, "n_cols_pad": I32, "stride_dz": I32, "stride_x": I32,
                       "stride_dw": I32},
        "_dx_kernel": {"dz_ptr": p, "w_ptr": p, "g_ptr": F32, "out_ptr": p, "row0": I32, "n_rows": I32, "H": I32,
                       "col0": I32, "n_cols": I32, "n_cols_pad": I32, "stride_dz": I32, "stride_w": I32,
                       "stride_out": I32},
    }


def _constexprs(name: str, cfg: K.LaunchConfig, precision: str) -> dict:
    common = {"DOT_PRECISION": precision, "UPCAST": False}
    tiles = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k}
    return {
        "_fwd_kernel": {"HAS_BIAS": True, **tiles, **common},
        "_bwd_kernel": {"HAS_BIAS": True, "COMPUTE_DX": True, "COMPUTE_DW": True, "COMPUTE_DB": True, **tiles,
                        "GROUP_M": cfg.group_m, **common},
        "_dz_kernel": {"HAS_BIAS": True, "COMPUTE_DB": True, **tiles, "GROUP_M": cfg.group_m, **common},
        "_dw_kernel": {"BLOCK_V": cfg.block_n, "BLOCK_H": cfg.block_h, "BLOCK_T": cfg.block_k, "GROUP_M": cfg.group_m,
                       **common},
        "_dx_kernel": {"ACCUMULATE": False, "BLOCK_M": cfg.block_m, "BLOCK_H": cfg.block_h, "BLOCK_V": cfg.block_k,
                       "GROUP_M": cfg.group_m, "ROUND_OUT": False, **common},
    }[name]


@pytest.mark.parametrize("name", ["_fwd_kernel", "_bwd_kernel", "_dz_kernel", "_dw_kernel", "_dx_kernel"])
@pytest.mark.parametrize("dt", ["bf16", "fp32"])
def test_kernel_compiles_for_sm90(name, dt):
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:  # an older Triton without this AOT interface
        pytest.skip(f"no Triton AOT interface: {e}")
    import torch

    dtype = torch.bfloat16 if dt == "bf16" else torch.float32
    cfg = K._launch_config(16384, dtype)
    sig = _signatures(dt)[name]
    consts = _constexprs(name, cfg, K._dot_precision(dtype))
    divisible = [i for i, (k, v) in enumerate(sig.items())
                 if v.startswith("*") or k in ("H", "n_cols_pad") or k.startswith("stride")]
    src = ASTSource(fn=getattr(K, name), signature={**sig, **dict.fromkeys(consts, "constexpr")}, constexprs=consts,
                    attrs={(i,): [["tt.divisibility", 16]] for i in divisible})
    try:
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    except FileNotFoundError as e:  # no ptxas shipped with this Triton
        pytest.skip(f"ptxas not found: {e}")
    assert out.asm["cubin"]
    if dt == "bf16" and name in ("_dw_kernel", "_dx_kernel", "_dz_kernel"):
        ttgir = out.asm["ttgir"]
        assert "warp_group_dot" in ttgir  # Hopper's wgmma
        pipelined = re.findall(r"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x", ttgir)
        assert sum(int(s) >= 2 for s in pipelined) >= 2, pipelined  # both operands of the main loop prefetched
