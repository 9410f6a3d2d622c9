// Nearest code on CUDA: a tiled GEMM of rows against codes with the argmin fused in, so the (N, K) scores never
// leave registers.
//
// One block of 256 threads owns kRows = 64 rows and sweeps the whole codebook in tiles of kCodes = 64 codes:
// - Per tile, the dot products of the 64 × 64 (row, code) pairs are accumulated over D in slices of kDims = 8:
//   each slice of x (64 rows) and of the codebook (64 codes) is staged in shared memory, transposed to (d, row) and
//   (d, code), converted to the compute type (float32, or float64 for float64 inputs). Thread (ty, tx) of the 16 × 16
//   grid holds a 4 × 4 register tile: rows ty + 16i and codes tx + 16j, so a warp's shared loads are a broadcast
//   (x) and 16 consecutive words (codes), free of bank conflicts. Slices past D are zero-padded (adding +0).
// - Threads tid < kCodes also sum the norm ||c_k||² of code k0 + tid over the same slices, in d order.
// - Then every thread scores its 16 pairs, norm − 2·dot, keeps the best code of each of its 4 rows, the 16 threads
//   of a row (one half-warp) reduce their bests with shuffles, and each folds the tile's winner into the row's
//   running (min, argmin), held in registers across tiles. Lane tx = 0 writes the index at the end.
// Every comparison uses nearest_code_better (csrc/include/nearest_code.h): a smaller score, or an equal one at a lower
// index, NaN first, so the answer is the lowest index of the minimum whatever order the candidates meet in. The dot
// products and norms are fused multiply-adds summed over d = 0, 1, … in order, as on the CPU's FMA path.
//
// Launches go on the current stream of x's device, so the op orders with the rest of torch's work and stays
// capturable in CUDA graphs; offsets are int64 (N·D may exceed 2^31), code indices int32 (K < 2^31 is checked).

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>
#include <type_traits>

#include "nearest_code.h"

namespace hermesflow_fast {

namespace {

constexpr int kThreads = 256;
constexpr int kSide = 16;                  // the threads form a kSide × kSide grid (ty, tx)
constexpr int kPerThread = 4;              // each holds kPerThread rows × kPerThread codes
constexpr int kRows = kSide * kPerThread;  // 64 rows per block
constexpr int kCodes = kSide * kPerThread; // 64 codes per tile
constexpr int kDims = 8;                   // dims per shared-memory slice
static_assert(kSide * kSide == kThreads, "one thread per (ty, tx)");
static_assert(kCodes <= kThreads, "one thread per code of a tile sums its norm");

template <typename acc_t>
__device__ __forceinline__ acc_t positive_infinity() {
  if constexpr (std::is_same_v<acc_t, double>) {
    return __longlong_as_double(0x7ff0000000000000LL);
  } else {
    return __int_as_float(0x7f800000);
  }
}

// x (N, D) and codebook (K, D) with their own strides -> out (N,) contiguous
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    nearest_code_kernel(const scalar_t* __restrict__ x, int64_t x_row_stride, int64_t x_dim_stride,
                        const scalar_t* __restrict__ book, int64_t book_row_stride, int64_t book_dim_stride,
                        int64_t rows, int64_t codes, int64_t dims, int64_t* __restrict__ out) {
  __shared__ acc_t xs[kDims][kRows];   // x[row0 + r, d0 + d] at xs[d][r]
  __shared__ acc_t cs[kDims][kCodes];  // codebook[k0 + c, d0 + d] at cs[d][c]
  __shared__ acc_t norms[kCodes];

  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % kSide;
  const int ty = tid / kSide;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;

  acc_t best[kPerThread];
  int best_k[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    // (+inf, INT_MAX) loses to every candidate, an +inf score at a real index included
    best[i] = positive_infinity<acc_t>();
    best_k[i] = INT_MAX;
  }

  for (int64_t k0 = 0; k0 < codes; k0 += kCodes) {
    acc_t acc[kPerThread][kPerThread];
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        acc[i][j] = acc_t(0);
      }
    }
    acc_t norm = acc_t(0);  // ||c_{k0 + tid}||², for tid < kCodes

    for (int64_t d0 = 0; d0 < dims; d0 += kDims) {
      // Stage the slices; consecutive threads read consecutive d of one row (coalesced when x is row-major).
      for (int e = tid; e < kRows * kDims; e += kThreads) {
        const int r = e / kDims;
        const int d = e % kDims;
        const int64_t row = row0 + r;
        const int64_t dim = d0 + d;
        xs[d][r] = row < rows && dim < dims ? static_cast<acc_t>(x[row * x_row_stride + dim * x_dim_stride])
                                            : acc_t(0);
      }
      for (int e = tid; e < kCodes * kDims; e += kThreads) {
        const int c = e / kDims;
        const int d = e % kDims;
        const int64_t code = k0 + c;
        const int64_t dim = d0 + d;
        cs[d][c] = code < codes && dim < dims
                       ? static_cast<acc_t>(book[code * book_row_stride + dim * book_dim_stride])
                       : acc_t(0);
      }
      __syncthreads();

      if (tid < kCodes) {
#pragma unroll
        for (int d = 0; d < kDims; ++d) {
          norm = cs[d][tid] * cs[d][tid] + norm;
        }
      }
#pragma unroll
      for (int d = 0; d < kDims; ++d) {
        acc_t a[kPerThread];
        acc_t b[kPerThread];
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
          a[i] = xs[d][ty + kSide * i];
          b[i] = cs[d][tx + kSide * i];
        }
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
#pragma unroll
          for (int j = 0; j < kPerThread; ++j) {
            acc[i][j] = a[i] * b[j] + acc[i][j];
          }
        }
      }
      __syncthreads();  // the slices are overwritten next
    }
    if (tid < kCodes) {
      norms[tid] = norm;
    }
    __syncthreads();

#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      acc_t tile_best = positive_infinity<acc_t>();
      int tile_k = INT_MAX;
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        const int c = tx + kSide * j;
        const int64_t k = k0 + c;
        if (k < codes) {
          const acc_t s = norms[c] - acc_t(2) * acc[i][j];  // −2·dot is exact: one rounding, fused or not
          if (nearest_code_better(s, k, tile_best, tile_k)) {
            tile_best = s;
            tile_k = static_cast<int>(k);
          }
        }
      }
      // The kSide threads of a row are lanes [0, 16) or [16, 32) of one warp: xor-shuffles stay inside the half.
#pragma unroll
      for (int offset = kSide / 2; offset > 0; offset /= 2) {
        const acc_t other = __shfl_xor_sync(0xffffffffu, tile_best, offset);
        const int other_k = __shfl_xor_sync(0xffffffffu, tile_k, offset);
        if (nearest_code_better(other, other_k, tile_best, tile_k)) {
          tile_best = other;
          tile_k = other_k;
        }
      }
      if (nearest_code_better(tile_best, tile_k, best[i], best_k[i])) {
        best[i] = tile_best;
        best_k[i] = tile_k;
      }
    }
    __syncthreads();  // norms is overwritten by the next tile
  }

  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int64_t row = row0 + ty + kSide * i;
      if (row < rows) {
        out[row] = best_k[i];
      }
    }
  }
}

}  // namespace

at::Tensor nearest_code_cuda(const at::Tensor& x, const at::Tensor& codebook) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t rows = x.size(0);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));  // (N,)
  if (rows == 0) {
    return out;  // a launch of 0 blocks is an error
  }
  const int64_t blocks = (rows + kRows - 1) / kRows;
  TORCH_CHECK(blocks <= INT_MAX, "nearest_code: x has too many rows for one launch, got shape ", x.sizes());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nearest_code_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    nearest_code_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), codebook.const_data_ptr<scalar_t>(),
        codebook.stride(0), codebook.stride(1), rows, codebook.size(0), x.size(1), out.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace hermesflow_fast
