// LFQ on the CPU: positions split across threads by at::parallel_for, channels of one position in a SIMD loop.
//
// at::parallel_for is OpenMP when this file is compiled with -fopenmp (CMakeLists.txt adds it when
// find_package(OpenMP) succeeds) and a plain serial loop otherwise; either way it honours torch.set_num_threads and
// never nests inside another parallel region. The loops read strided input in place: a non-contiguous z or indices
// is viewed as 2-D (positions, channels) / 1-D (positions) with its own strides, and copied only when its leading
// dims cannot be collapsed into one (reshape decides).
//
// Work is tiny per element (one compare, one shift), so the grain is sized in elements, not positions: a thread gets
// at least 32768 channel reads (ATen's own at::internal::GRAIN_SIZE), below which waking threads costs more than it
// saves.

#include <ATen/Dispatch.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <string>
#include <type_traits>

#include "lfq.h"

namespace hermesflow_fast {

namespace {

constexpr int64_t kGrainElements = 32768;  // = at::internal::GRAIN_SIZE (ATen/TensorIterator.h, a heavy include)

int64_t grain_in_positions(int64_t elements_per_position) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_position));
}

// index = Σ_c bit_c · 2^(C−1−c). Each channel's term is independent of the others, so the OR-reduction vectorizes
// (a running `index = index << 1 | bit` would chain every iteration on the previous one).
template <typename scalar_t>
void quantize_rows(const scalar_t* z, int64_t* out, int64_t begin, int64_t end, int64_t channels, int64_t row_stride,
                   int64_t channel_stride) {
  for (int64_t n = begin; n < end; ++n) {
    const scalar_t* row = z + n * row_stride;  // (C,) with stride channel_stride
    int64_t index = 0;
    if (channel_stride == 1) {
#pragma omp simd reduction(| : index)
      for (int64_t c = 0; c < channels; ++c) {
        index |= lfq_bit(row[c]) << (channels - 1 - c);
      }
    } else {
      for (int64_t c = 0; c < channels; ++c) {
        index |= lfq_bit(row[c * channel_stride]) << (channels - 1 - c);
      }
    }
    out[n] = index;
  }
}

// codes (N, bits) of indices (N,) with stride `stride`, rows [begin, end). Returns the first position in the range
// whose index is outside [0, limit), or INT64_MAX. Cast to uint64, a negative index becomes ≥ 2^63 > limit, so one
// unsigned compare catches both ends for every integer dtype.
template <typename index_t>
int64_t codes_rows(const index_t* indices, float* out, int64_t begin, int64_t end, int64_t bits, int64_t stride,
                   uint64_t limit) {
  int64_t first_bad = std::numeric_limits<int64_t>::max();
  for (int64_t n = begin; n < end; ++n) {
    const index_t raw = indices[n * stride];
    if (static_cast<uint64_t>(raw) >= limit && n < first_bad) {
      first_bad = n;
    }
    const int64_t index = static_cast<int64_t>(raw);
    float* code = out + n * bits;  // (bits,)
#pragma omp simd
    for (int64_t c = 0; c < bits; ++c) {
      code[c] = lfq_code(index, bits, c);
    }
  }
  return first_bad;
}

// Decimal text of an index of any integer type, for the out-of-range message (uint64 would not fit an int64).
template <typename index_t>
std::string index_to_string(index_t v) {
  if constexpr (std::is_signed_v<index_t>) {
    return std::to_string(static_cast<long long>(v));
  } else {
    return std::to_string(static_cast<unsigned long long>(v));
  }
}

}  // namespace

at::Tensor lfq_quantize_cpu(const at::Tensor& z) {
  const int64_t channels = z.size(-1);             // C
  const int64_t positions = z.numel() / channels;  // N = prod(...)
  at::Tensor out = at::empty(z.sizes().slice(0, z.dim() - 1), z.options().dtype(at::kLong));  // (...)
  if (positions == 0) {
    return out;
  }
  const at::Tensor rows = z.reshape({positions, channels});  // (N, C), a view unless the leading dims won't collapse
  int64_t* out_ptr = out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "lfq_quantize_cpu", [&] {
    const scalar_t* z_ptr = rows.const_data_ptr<scalar_t>();
    const int64_t row_stride = rows.stride(0);
    const int64_t channel_stride = rows.stride(1);
    at::parallel_for(0, positions, grain_in_positions(channels), [&](int64_t begin, int64_t end) {
      quantize_rows(z_ptr, out_ptr, begin, end, channels, row_stride, channel_stride);
    });
  });
  return out;
}

at::Tensor lfq_codes_cpu(const at::Tensor& indices, int64_t bits) {
  const int64_t positions = indices.numel();  // N = prod(...)
  at::Tensor out = empty_codes(indices, bits);  // (..., bits)
  if (positions == 0) {
    return out;
  }
  const at::Tensor flat = indices.reshape({positions});  // (N,), a view unless the dims won't collapse
  const int64_t stride = flat.stride(0);
  float* out_ptr = out.data_ptr<float>();

  // The first bad position (lowest over all threads) is kept for the message; the codes are still written, then
  // discarded with the error.
  const uint64_t limit = uint64_t{1} << bits;  // valid indices lie in [0, 2^bits)
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  std::string bad_value;

  AT_DISPATCH_V2(
      indices.scalar_type(), "lfq_codes_cpu", AT_WRAP([&] {
        const scalar_t* idx_ptr = flat.const_data_ptr<scalar_t>();
        at::parallel_for(0, positions, grain_in_positions(bits), [&](int64_t begin, int64_t end) {
          const int64_t bad = codes_rows(idx_ptr, out_ptr, begin, end, bits, stride, limit);
          int64_t seen = first_bad.load(std::memory_order_relaxed);
          while (bad < seen && !first_bad.compare_exchange_weak(seen, bad, std::memory_order_relaxed)) {
            // lower the shared minimum to this chunk's first bad position; `seen` is refreshed on failure
          }
        });
        const int64_t n = first_bad.load();
        if (n != std::numeric_limits<int64_t>::max()) {
          bad_value = index_to_string(idx_ptr[n * stride]);
        }
      }),
      AT_EXPAND(AT_INTEGRAL_TYPES_V2));

  const int64_t n = first_bad.load();
  TORCH_CHECK_VALUE(n == std::numeric_limits<int64_t>::max(), "lfq_codes: indices must lie in [0, 2^bits) = [0, ",
                    limit, ") for bits=", bits, ", got ", bad_value, " at flat position ", n,
                    " of indices with shape ", indices.sizes());
  return out;
}

}  // namespace hermesflow_fast
