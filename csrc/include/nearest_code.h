// Nearest code (vector quantization) by squared L2: the definition, and the declarations shared by the binding
// (csrc/nearest_code.cpp), the CPU kernel (csrc/cpu/nearest_code_cpu.cpp) and the CUDA kernel
// (csrc/cuda/nearest_code_cuda.cu).
//
// For each row x_n of x (N, D) over the codebook (K, D):
//     score_nk = ||c_k||² − 2 ⟨x_n, c_k⟩          ||x_n||² is the same for every k, so it is left out
//     index_n  = argmin_k score_nk                the lowest k on ties; a NaN score counts as the minimum
// computed in float32 for float32/float16/bfloat16 inputs and in float64 for float64 inputs: the norms ||c_k||² and
// the dot products are each summed over d = 0, 1, …, D−1 in that order (fused multiply-adds where the hardware has
// them), then `norm − 2·dot`. The plain-torch twin is reference.nearest_code in hermesflow_fast/ops/reference.py;
// where the scores are exact (integer-valued inputs of moderate size) every kernel gives its indices, ties
// included. No kernel holds the (N, K) matrix of scores: each keeps one running (min, argmin) per row.
//
// The kernels below trust their arguments: csrc/nearest_code.cpp checks them once, before any backend runs.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <limits>

#ifndef HFF_HOST_DEVICE
#if defined(__CUDACC__)
#define HFF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HFF_HOST_DEVICE inline
#endif
#endif

namespace hermesflow_fast {

// Code indices are carried as int32 inside the kernels (the float32 CPU path packs them in 32-bit SIMD lanes next to
// the scores), so K is capped at 2^31 − 1 rows; real VQ codebooks hold 2^10 to 2^18 codes.
constexpr int64_t kNearestCodeMaxCodes = std::numeric_limits<int32_t>::max();

// ---------------------------------------------------------------------------------------------------------------------
// The order of two candidates (score, index), one place for CPU and CUDA
// ---------------------------------------------------------------------------------------------------------------------

// True when candidate (s, k) beats (best, best_k): a smaller score, or an equal score at a lower index; NaN is
// smaller than every number, as in torch.argmin, and the lower index wins between two NaNs. This is the full order,
// used where candidates of arbitrary indices meet (the CUDA reductions); a sweep over increasing k only needs
// `s < best` (plus the NaN case), which is what the CPU kernel's inner loop does.
template <typename T>
HFF_HOST_DEVICE bool nearest_code_better(T s, int64_t k, T best, int64_t best_k) {
  const bool s_nan = s != s;
  const bool best_nan = best != best;
  if (s_nan || best_nan) {
    return s_nan && (!best_nan || k < best_k);
  }
  return s < best || (s == best && k < best_k);
}

// ---------------------------------------------------------------------------------------------------------------------
// Argument checks (csrc/nearest_code.cpp): raise c10::ValueError, which Python sees as ValueError
// ---------------------------------------------------------------------------------------------------------------------

void check_nearest_code_args(const at::Tensor& x, const at::Tensor& codebook);

// ---------------------------------------------------------------------------------------------------------------------
// Kernels: x (N, D), codebook (K, D), float32/float64/float16/bfloat16, any strides -> (N,) int64 on x's device
// ---------------------------------------------------------------------------------------------------------------------

at::Tensor nearest_code_cpu(const at::Tensor& x, const at::Tensor& codebook);

// Defined only when CMake builds csrc/cuda/ (HFF_WITH_CUDA); csrc/nearest_code.cpp registers it under the same
// condition.
at::Tensor nearest_code_cuda(const at::Tensor& x, const at::Tensor& codebook);

}  // namespace hermesflow_fast
