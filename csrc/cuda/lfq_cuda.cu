// LFQ on CUDA: one thread per position for lfq_quantize, one thread per output element for lfq_codes.
//
// Both ops move a few bytes per position and do one compare or shift per byte, so they are bound by memory traffic
// and the layout of the threads is chosen for coalescing, not arithmetic:
// - lfq_quantize reads C channels and writes one int64 per position. A thread per position loops over its C
//   channels; the C·N inputs of a warp lie in one contiguous span, so the lines a warp touches are fully used across
//   its loop (through L1), and the int64 writes of a warp are contiguous.
// - lfq_codes reads one index and writes `bits` floats per position. The writes dominate (bits·4 bytes against 2 to
//   8), so each thread owns one output float: a warp stores 128 contiguous bytes, and the `bits` threads that share
//   an index read it from the same cache line.
// Grid-stride loops with int64 offsets: N·C may exceed 2^31. Launches go on the current stream of z's device, so
// the ops order with the rest of torch's work and stay capturable in CUDA graphs.
//
// Index values are not range-checked here (a check would need a host sync to report): the code is built from the
// low `bits` bits, the same answer the reference gives. The CPU kernel and hermesflow_fast/ops/lfq.py check them.

#include <ATen/Dispatch.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "lfq.h"

namespace hermesflow_fast {

namespace {

constexpr int kThreads = 256;
// Enough blocks to fill any current GPU many times over; the grid-stride loop covers the rest.
constexpr int64_t kMaxBlocks = int64_t{1} << 16;

int blocks_for(int64_t work) {
  return static_cast<int>(std::min<int64_t>((work + kThreads - 1) / kThreads, kMaxBlocks));
}

// z (N, C) with strides (row_stride, channel_stride) -> out (N,) contiguous
template <typename scalar_t>
__global__ void lfq_quantize_kernel(const scalar_t* __restrict__ z, int64_t* __restrict__ out, int64_t positions,
                                    int64_t channels, int64_t row_stride, int64_t channel_stride) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < positions; n += step) {
    const scalar_t* row = z + n * row_stride;
    int64_t index = 0;
    for (int64_t c = 0; c < channels; ++c) {
      index |= lfq_bit(row[c * channel_stride]) << (channels - 1 - c);
    }
    out[n] = index;
  }
}

// indices (N,) with stride `stride` -> out (N, bits) contiguous; thread e writes out[e], e = n·bits + c
template <typename index_t>
__global__ void lfq_codes_kernel(const index_t* __restrict__ indices, float* __restrict__ out, int64_t elements,
                                 int64_t bits, int64_t stride) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < elements; e += step) {
    const int64_t n = e / bits;
    const int64_t c = e - n * bits;
    out[e] = lfq_code(static_cast<int64_t>(indices[n * stride]), bits, c);
  }
}

}  // namespace

at::Tensor lfq_quantize_cuda(const at::Tensor& z) {
  const c10::cuda::CUDAGuard device_guard(z.device());
  const int64_t channels = z.size(-1);             // C
  const int64_t positions = z.numel() / channels;  // N = prod(...)
  at::Tensor out = at::empty(z.sizes().slice(0, z.dim() - 1), z.options().dtype(at::kLong));  // (...)
  if (positions == 0) {
    return out;  // a launch of 0 blocks is an error
  }
  const at::Tensor rows = z.reshape({positions, channels});  // (N, C), a view unless the leading dims won't collapse
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "lfq_quantize_cuda", [&] {
    lfq_quantize_kernel<scalar_t><<<blocks_for(positions), kThreads, 0, stream>>>(
        rows.const_data_ptr<scalar_t>(), out.data_ptr<int64_t>(), positions, channels, rows.stride(0),
        rows.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor lfq_codes_cuda(const at::Tensor& indices, int64_t bits) {
  const c10::cuda::CUDAGuard device_guard(indices.device());
  const int64_t positions = indices.numel();  // N = prod(...)
  at::Tensor out = empty_codes(indices, bits);  // (..., bits)
  if (positions == 0) {
    return out;
  }
  const at::Tensor flat = indices.reshape({positions});  // (N,), a view unless the dims won't collapse
  const int64_t elements = positions * bits;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_V2(
      indices.scalar_type(), "lfq_codes_cuda", AT_WRAP([&] {
        lfq_codes_kernel<scalar_t><<<blocks_for(elements), kThreads, 0, stream>>>(
            flat.const_data_ptr<scalar_t>(), out.data_ptr<float>(), elements, bits, flat.stride(0));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }),
      AT_EXPAND(AT_INTEGRAL_TYPES_V2));
  return out;
}

}  // namespace hermesflow_fast
