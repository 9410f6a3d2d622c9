// Nearest code on the CPU: rows split across threads by at::parallel_for, the codebook swept in cache-sized tiles by
// a register-blocked SIMD kernel that keeps one running (min, argmin) per row. O(N) extra memory: no (N, K) scores.
//
// The layout puts rows, not codes, in the SIMD lanes:
// - A thread takes a chunk of kChunkGroups·L rows (L lanes per vector: 8 float32 or 4 float64 with AVX2, half that
//   on the baseline ISA) and packs it, converted to the compute type, as "groups" of L rows transposed to (D, L):
//   lane l of xt[g·D + d] is x[first + g·L + l, d]. Strided x is read in place; the chunk's rows past N are zeros
//   and never written out.
// - The codebook is used as a contiguous (K, D) array of the compute type (a copy only when it is not one already),
//   with its norms ||c_k||² computed once; it is swept in tiles of about kTileBytes, which stay in L2 while every
//   group of the chunk runs over them.
// - The micro-kernel takes V = 2 groups (2·L rows) against C = 4 codes: 8 vector accumulators, and per d two vector
//   loads of x and four broadcasts of code values for eight fused multiply-adds. It then turns each dot product into
//   a score, norm − 2·dot, and updates the per-lane (best, index) held in registers. Codes are visited in increasing
//   order and a lane takes a score only when it is strictly smaller, so ties keep the lowest index with no reduction
//   across lanes or threads (every row belongs to one lane of one thread).
//
// NaN: torch.argmin takes the first NaN as the minimum. A NaN score needs a NaN or inf input, or an overflow; the
// kernel bounds the scores of a chunk from the norms (|score| ≤ ||c||² + 2·||x||·||c||) and runs the plain `<`
// update when they cannot be NaN, the NaN-aware one (two more compares per score) only otherwise.
//
// SIMD: the vectors are GCC/Clang vector extensions. On x86-64 the kernel is compiled twice: with 16-byte vectors for
// the baseline ISA (SSE2, no FMA) and with 32-byte vectors for AVX2 + FMA, which runs where the CPU has both
// (checked once). The build needs no -march flag, so one binary runs on any x86-64; elsewhere (aarch64: NEON) the
// 16-byte kernel is the only one. `a * b + c` is written as one expression so that the compiler fuses it where FMA
// is enabled (GCC's default -ffp-contract=fast, Clang's =on): a row's dot products are summed over d in order, with
// one rounding per step under FMA, two without. HFF_CPU_ISA=generic in the environment (read at the first call)
// forces the baseline kernel, for tests and timing.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "nearest_code.h"

#if !defined(__GNUC__)
#error "csrc/cpu/nearest_code_cpu.cpp needs GCC or Clang (vector extensions and the target attribute)"
#endif

#define HFF_ALWAYS_INLINE inline __attribute__((always_inline))

namespace hermesflow_fast {

namespace {

// ---------------------------------------------------------------------------------------------------------------------
// Vectors and sizes
// ---------------------------------------------------------------------------------------------------------------------

// One register of scores and the matching one of code indices (the same lane width, so a compare mask selects both).
// aligned(32) on the AVX2 types: without it GCC gives them the 16-byte alignment of the baseline ISA this file is
// compiled for, while the AVX2 code that uses them assumes 32 (and faults on a 16-byte aligned buffer). The attribute
// is lost when such a type is a template argument (-Wignored-attributes), so each specialization declares its own
// types, and buffers of them come from c10's CPU allocator, 64-byte aligned (std::vector would align to 16).
template <typename acc_t, int Bytes>
struct Simd;
template <>
struct Simd<float, 16> {
  typedef float Vec __attribute__((vector_size(16)));
  typedef int32_t Index __attribute__((vector_size(16)));
  using index_t = int32_t;
  static constexpr int kLanes = 4;
};
template <>
struct Simd<double, 16> {
  typedef double Vec __attribute__((vector_size(16)));
  typedef int64_t Index __attribute__((vector_size(16)));
  using index_t = int64_t;
  static constexpr int kLanes = 2;
};
template <>
struct Simd<float, 32> {
  typedef float Vec __attribute__((vector_size(32), aligned(32)));
  typedef int32_t Index __attribute__((vector_size(32), aligned(32)));
  using index_t = int32_t;
  static constexpr int kLanes = 8;
};
template <>
struct Simd<double, 32> {
  typedef double Vec __attribute__((vector_size(32), aligned(32)));
  typedef int64_t Index __attribute__((vector_size(32), aligned(32)));
  using index_t = int64_t;
  static constexpr int kLanes = 4;
};

constexpr int kGroupsPerStep = 2;          // V: row vectors per micro-kernel call
constexpr int kCodesPerStep = 4;           // C: codes per micro-kernel call
constexpr int64_t kChunkGroups = 8;        // row vectors per thread chunk: 64 float32 rows with AVX2
constexpr int64_t kTileBytes = 128 << 10;  // codebook tile: a quarter of a 512 KiB L2, next to the chunk's rows
constexpr int64_t kGrainWork = 1 << 20;    // multiply-adds a thread must get before another one is woken
static_assert(kChunkGroups % kGroupsPerStep == 0, "a chunk is a whole number of micro-kernel row blocks");

// v = (value, value, …), outside the hot loops. Written through a reference: a function returning a 32-byte vector
// would draw GCC's ABI warning in the baseline-ISA code. Inside the kernels, broadcasts are left to `vector op scalar`
// expressions, the one spelling GCC turns into a broadcast instruction in code inlined into the AVX2 entry point (a
// helper like this one compiles to a chain of lane inserts there).
template <typename V, typename T>
HFF_ALWAYS_INLINE void splat(V& v, T value) {
  for (size_t l = 0; l < sizeof(V) / sizeof(T); ++l) {
    v[l] = value;
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// The micro-kernel and the sweep of one chunk over the codebook (inlined into each ISA's entry point below)
// ---------------------------------------------------------------------------------------------------------------------

template <typename acc_t, int Bytes>
struct Sweep {
  using Vec = typename Simd<acc_t, Bytes>::Vec;
  using Index = typename Simd<acc_t, Bytes>::Index;
  const Vec* xt;       // (groups, D) vectors of L rows: the chunk's rows, transposed per group
  int64_t groups;      // a multiple of kGroupsPerStep
  int64_t dims;        // D
  const acc_t* codes;  // (K, D) contiguous
  const acc_t* norms;  // (K,)
  int64_t num_codes;   // K
  int64_t tile;        // codes per tile, a multiple of kCodesPerStep
  Vec* best;           // (groups,) running minimum score of each row
  Index* index;        // (groups,) its code index
};

// Scores of V row vectors against codes [k, k + C), folded into (best, index); `code_index` holds k in every lane
// and is advanced past the C codes. Each score is the same sequence of operations whatever V and C are, so the tail
// (C = 1) gives bit-identical scores to the main loop.
template <typename acc_t, int Bytes, int V, int C, bool kNanAware>
HFF_ALWAYS_INLINE void micro_step(const typename Simd<acc_t, Bytes>::Vec* xt, int64_t dims, const acc_t* codes,
                                  const acc_t* norms, int64_t k, typename Simd<acc_t, Bytes>::Index& code_index,
                                  typename Simd<acc_t, Bytes>::Vec* best, typename Simd<acc_t, Bytes>::Index* index) {
  using Vec = typename Simd<acc_t, Bytes>::Vec;
  Vec acc[V][C];
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) {
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      acc[v][c] = Vec{};
    }
  }
  const acc_t* code = codes + k * dims;  // C rows of D
  for (int64_t d = 0; d < dims; ++d) {
    Vec xv[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      xv[v] = xt[v * dims + d];
    }
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const acc_t cd = code[c * dims + d];
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) {
        acc[v][c] = xv[v] * cd + acc[v][c];  // a broadcast and one FMA where the ISA has it
      }
    }
  }
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) {
    const acc_t norm = norms[k + c];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      const Vec s = acc[v][c] * acc_t(-2) + norm;  // norm − 2·dot: −2·dot is exact, so fused or not it rounds once
      auto take = s < best[v];
      if constexpr (kNanAware) {
        take = take | ((s != s) & (best[v] == best[v]));  // the first NaN wins, then stays
      }
      best[v] = take ? s : best[v];
      index[v] = take ? code_index : index[v];
    }
    code_index += 1;
  }
}

template <typename acc_t, int Bytes, bool kNanAware>
HFF_ALWAYS_INLINE void sweep_impl(const Sweep<acc_t, Bytes>& p) {
  using S = Simd<acc_t, Bytes>;
  constexpr int V = kGroupsPerStep;
  for (int64_t k0 = 0; k0 < p.num_codes; k0 += p.tile) {
    const int64_t k1 = std::min(p.num_codes, k0 + p.tile);
    for (int64_t g = 0; g < p.groups; g += V) {
      typename S::Vec best[V];
      typename S::Index index[V];
      for (int v = 0; v < V; ++v) {
        best[v] = p.best[g + v];
        index[v] = p.index[g + v];
      }
      const typename S::Vec* xt = p.xt + g * p.dims;
      typename S::Index code_index;
      splat(code_index, static_cast<typename S::index_t>(k0));
      int64_t k = k0;
      for (; k + kCodesPerStep <= k1; k += kCodesPerStep) {
        micro_step<acc_t, Bytes, V, kCodesPerStep, kNanAware>(xt, p.dims, p.codes, p.norms, k, code_index, best,
                                                              index);
      }
      for (; k < k1; ++k) {
        micro_step<acc_t, Bytes, V, 1, kNanAware>(xt, p.dims, p.codes, p.norms, k, code_index, best, index);
      }
      for (int v = 0; v < V; ++v) {
        p.best[g + v] = best[v];
        p.index[g + v] = index[v];
      }
    }
  }
}

// ||c_k||² for k in [begin, end), summed over d in order (fused where the ISA has FMA, as the dot products are).
template <typename acc_t>
HFF_ALWAYS_INLINE void norms_impl(const acc_t* codes, acc_t* norms, int64_t begin, int64_t end, int64_t dims) {
  for (int64_t k = begin; k < end; ++k) {
    const acc_t* code = codes + k * dims;
    acc_t n = 0;
    for (int64_t d = 0; d < dims; ++d) {
      n = code[d] * code[d] + n;
    }
    norms[k] = n;
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// One entry point per ISA, picked once
// ---------------------------------------------------------------------------------------------------------------------

template <typename acc_t, int Bytes>
struct Kernels {
  void (*sweep)(const Sweep<acc_t, Bytes>&);
  void (*sweep_nan_aware)(const Sweep<acc_t, Bytes>&);
  void (*norms)(const acc_t*, acc_t*, int64_t, int64_t, int64_t);
};

template <typename acc_t, bool kNanAware>
void sweep_generic(const Sweep<acc_t, 16>& p) {
  sweep_impl<acc_t, 16, kNanAware>(p);
}

template <typename acc_t>
void norms_generic(const acc_t* codes, acc_t* norms, int64_t begin, int64_t end, int64_t dims) {
  norms_impl(codes, norms, begin, end, dims);
}

template <typename acc_t>
Kernels<acc_t, 16> generic_kernels() {
  return {&sweep_generic<acc_t, false>, &sweep_generic<acc_t, true>, &norms_generic<acc_t>};
}

#if defined(__x86_64__) || defined(__i386__)
#define HFF_NEAREST_CODE_AVX2 1

template <typename acc_t, bool kNanAware>
__attribute__((target("avx2,fma"))) void sweep_avx2(const Sweep<acc_t, 32>& p) {
  sweep_impl<acc_t, 32, kNanAware>(p);
}

template <typename acc_t>
__attribute__((target("avx2,fma"))) void norms_avx2(const acc_t* codes, acc_t* norms, int64_t begin, int64_t end,
                                                    int64_t dims) {
  norms_impl(codes, norms, begin, end, dims);
}

template <typename acc_t>
Kernels<acc_t, 32> avx2_kernels() {
  return {&sweep_avx2<acc_t, false>, &sweep_avx2<acc_t, true>, &norms_avx2<acc_t>};
}
#endif

bool use_avx2() {
#if defined(HFF_NEAREST_CODE_AVX2)
  static const bool yes = [] {
    const char* isa = std::getenv("HFF_CPU_ISA");
    if (isa != nullptr && std::strcmp(isa, "generic") == 0) {
      return false;
    }
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
#else
  return false;
#endif
}

// ---------------------------------------------------------------------------------------------------------------------
// Packing a chunk of rows, and the driver
// ---------------------------------------------------------------------------------------------------------------------

// Rows [first, first + rows) of x into xt (groups·D vectors, zeros past `rows`), in the compute type. Returns the
// largest ||x_n||² of the chunk in double, +inf when one is not finite (a NaN or inf in x), for the NaN bound.
template <typename scalar_t, typename acc_t, int Bytes>
double pack_rows(const scalar_t* x, int64_t row_stride, int64_t dim_stride, int64_t first, int64_t rows,
                 int64_t dims, int64_t groups, typename Simd<acc_t, Bytes>::Vec* xt) {
  constexpr int L = Simd<acc_t, Bytes>::kLanes;
  double largest = 0;
  bool finite = true;
  for (int64_t g = 0; g < groups; ++g) {
    typename Simd<acc_t, Bytes>::Vec* out = xt + g * dims;
    for (int l = 0; l < L; ++l) {
      const int64_t r = g * L + l;
      if (r >= rows) {
        for (int64_t d = 0; d < dims; ++d) {
          out[d][l] = acc_t(0);
        }
        continue;
      }
      const scalar_t* row = x + (first + r) * row_stride;
      double squares = 0;
      for (int64_t d = 0; d < dims; ++d) {
        const acc_t v = static_cast<acc_t>(row[d * dim_stride]);
        out[d][l] = v;
        squares += static_cast<double>(v) * static_cast<double>(v);
      }
      finite = finite && squares <= std::numeric_limits<double>::max();  // false for NaN and inf
      largest = std::max(largest, squares);
    }
  }
  return finite ? largest : std::numeric_limits<double>::infinity();
}

// True when no score of rows with ||x||² ≤ x_sq against codes with ||c||² ≤ c_sq can be NaN: every partial sum and
// score is bounded by ||c||² + 2·||x||·||c|| (Cauchy–Schwarz), which must stay well inside acc_t's range.
template <typename acc_t>
bool scores_are_numbers(double x_sq, double c_sq) {
  const double bound = c_sq + 2 * std::sqrt(x_sq) * std::sqrt(c_sq);
  return bound <= 0.25 * static_cast<double>(std::numeric_limits<acc_t>::max());  // false for NaN and inf
}

template <typename scalar_t, typename acc_t, int Bytes>
void nearest_code_typed(const at::Tensor& x, const at::Tensor& codebook, at::Tensor& out,
                        const Kernels<acc_t, Bytes>& kernels) {
  using S = Simd<acc_t, Bytes>;
  using Vec = typename S::Vec;
  using Index = typename S::Index;
  constexpr int64_t L = S::kLanes;
  const int64_t rows = x.size(0);
  const int64_t dims = x.size(1);
  const int64_t num_codes = codebook.size(0);

  // The codebook as a contiguous (K, D) array of acc_t, and its norms.
  const at::Tensor book = codebook.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* codes = book.const_data_ptr<acc_t>();
  at::Tensor norms_tensor = at::empty({num_codes}, book.options());
  acc_t* norms = norms_tensor.data_ptr<acc_t>();
  const int64_t norm_grain = std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, dims));
  at::parallel_for(0, num_codes, norm_grain, [&](int64_t begin, int64_t end) {
    kernels.norms(codes, norms, begin, end, dims);
  });
  double codes_sq = 0;  // the largest norm, +inf when one is not finite
  for (int64_t k = 0; k < num_codes; ++k) {
    const double n = static_cast<double>(norms[k]);
    codes_sq = n <= std::numeric_limits<double>::max() ? std::max(codes_sq, n)
                                                       : std::numeric_limits<double>::infinity();
  }

  const int64_t bytes_per_code = std::max<int64_t>(1, dims) * static_cast<int64_t>(sizeof(acc_t));
  const int64_t tile = std::max<int64_t>(1, kTileBytes / bytes_per_code / kCodesPerStep) * kCodesPerStep;
  constexpr int64_t chunk_rows = kChunkGroups * L;
  const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
  const int64_t chunk_work = chunk_rows * num_codes * std::max<int64_t>(1, dims);
  const int64_t grain = std::max<int64_t>(1, kGrainWork / chunk_work);

  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const int64_t row_stride = x.stride(0);
  const int64_t dim_stride = x.stride(1);
  int64_t* out_ptr = out.data_ptr<int64_t>();

  at::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
    // One buffer per thread: the chunk's rows (kChunkGroups·D vectors), then its best scores and their indices.
    const size_t bytes = (kChunkGroups * dims + kChunkGroups) * sizeof(Vec) + kChunkGroups * sizeof(Index);
    const c10::DataPtr buffer = c10::GetCPUAllocator()->allocate(bytes);
    Vec* xt = static_cast<Vec*>(buffer.get());
    Vec* best = xt + kChunkGroups * dims;
    Index* index = reinterpret_cast<Index*>(best + kChunkGroups);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t first = chunk * chunk_rows;
      const int64_t n = std::min(chunk_rows, rows - first);
      const int64_t groups = (n + L * kGroupsPerStep - 1) / (L * kGroupsPerStep) * kGroupsPerStep;
      const double rows_sq = pack_rows<scalar_t, acc_t, Bytes>(x_ptr, row_stride, dim_stride, first, n, dims, groups,
                                                               xt);
      for (int64_t g = 0; g < kChunkGroups; ++g) {
        splat(best[g], std::numeric_limits<acc_t>::infinity());
        splat(index[g], static_cast<typename S::index_t>(0));
      }
      const Sweep<acc_t, Bytes> sweep{xt, groups, dims, codes, norms, num_codes, tile, best, index};
      if (scores_are_numbers<acc_t>(rows_sq, codes_sq)) {
        kernels.sweep(sweep);
      } else {
        kernels.sweep_nan_aware(sweep);
      }
      for (int64_t r = 0; r < n; ++r) {
        out_ptr[first + r] = static_cast<int64_t>(index[r / L][r % L]);
      }
    }
  });
}

}  // namespace

at::Tensor nearest_code_cpu(const at::Tensor& x, const at::Tensor& codebook) {
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kLong));  // (N,)
  if (x.size(0) == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nearest_code_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
#if defined(HFF_NEAREST_CODE_AVX2)
    if (use_avx2()) {
      nearest_code_typed<scalar_t, acc_t, 32>(x, codebook, out, avx2_kernels<acc_t>());
      return;
    }
#endif
    nearest_code_typed<scalar_t, acc_t, 16>(x, codebook, out, generic_kernels<acc_t>());
  });
  return out;
}

}  // namespace hermesflow_fast
