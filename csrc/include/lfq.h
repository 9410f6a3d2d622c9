// LFQ (lookup-free quantization, MAGVIT-v2: Show-o's image tokenizer): the math, and the declarations shared by
// the binding (csrc/lfq.cpp), the CPU kernels (csrc/cpu/lfq_cpu.cpp) and the CUDA kernels (csrc/cuda/lfq_cuda.cu).
//
// Over the last dim C of z (..., C):
//     bit_c  = [z_c > 0]                    strict: +0, -0 and NaN all give 0
//     index  = Σ_c bit_c · 2^(C−1−c)         channel 0 is the most significant bit, C ≤ 62
//     code_c = +1 if bit_c else −1           lfq_codes(index, C) is the inverse of lfq_quantize on the signs
// The plain-torch twin is hermesflow_fast/ops/reference.py; every kernel must agree with it bit for bit.
//
// The kernels below trust their arguments: csrc/lfq.cpp checks them once, before any backend runs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#if defined(__CUDACC__)
#define HFF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HFF_HOST_DEVICE inline
#endif

namespace hermesflow_fast {

// Why 62 and not 63 or 64: the index is an int64, and the exclusive upper bound 2^bits of a valid index must be an
// int64 as well, so that the range check on lfq_codes' input (and any caller's `2 ** bits` codebook size) cannot
// overflow. Real LFQ codebooks use 10 to 18 bits (Show-o's MAGVIT-v2: 2^13 = 8192 codes).
constexpr int64_t kLfqMaxBits = 62;

// ---------------------------------------------------------------------------------------------------------------------
// The math, one place for CPU and CUDA
// ---------------------------------------------------------------------------------------------------------------------

// The type a channel is compared in. Half and bfloat16 widen to float (exact: every half/bf16 value is a float, so
// the sign test is unchanged); float and double stay themselves, because narrowing a double such as 1e-300 to float
// would round it to +0 and flip its bit.
template <typename T>
struct LfqCompareType {
  using type = T;
};
template <>
struct LfqCompareType<c10::Half> {
  using type = float;
};
template <>
struct LfqCompareType<c10::BFloat16> {
  using type = float;
};

// bit_c = [z_c > 0], as an int64 ready to be shifted into place. NaN compares false, like the reference's `z > 0`.
template <typename T>
HFF_HOST_DEVICE int64_t lfq_bit(T v) {
  using Acc = typename LfqCompareType<T>::type;
  return static_cast<Acc>(v) > Acc(0) ? 1 : 0;
}

// code_c of an index: ±1 from bit (bits−1−c) of the index. Only the low `bits` bits are read, so an out-of-range
// index gives the same code as the reference's `(i >> shift) & 1` (two's complement for negative indices).
HFF_HOST_DEVICE float lfq_code(int64_t index, int64_t bits, int64_t c) {
  return ((index >> (bits - 1 - c)) & 1) ? 1.0f : -1.0f;
}

// ---------------------------------------------------------------------------------------------------------------------
// Argument checks (csrc/lfq.cpp): raise c10::ValueError, which Python sees as ValueError
// ---------------------------------------------------------------------------------------------------------------------

void check_lfq_quantize_args(const at::Tensor& z);
void check_lfq_codes_args(const at::Tensor& indices, int64_t bits);

// The (..., bits) float32 output of lfq_codes on indices' device, uninitialized (csrc/lfq.cpp; Meta, CPU and CUDA).
at::Tensor empty_codes(const at::Tensor& indices, int64_t bits);

// ---------------------------------------------------------------------------------------------------------------------
// Kernels: z (..., C) float32/float64/float16/bfloat16 -> (...) int64;  indices (...) any integer -> (..., bits) float32
// ---------------------------------------------------------------------------------------------------------------------

at::Tensor lfq_quantize_cpu(const at::Tensor& z);
at::Tensor lfq_codes_cpu(const at::Tensor& indices, int64_t bits);

// Defined only when CMake builds csrc/cuda/ (HFF_WITH_CUDA); csrc/lfq.cpp registers them under the same condition.
at::Tensor lfq_quantize_cuda(const at::Tensor& z);
at::Tensor lfq_codes_cuda(const at::Tensor& indices, int64_t bits);

}  // namespace hermesflow_fast
