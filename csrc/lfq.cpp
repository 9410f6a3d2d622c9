// hermesflow_fast::lfq_quantize and hermesflow_fast::lfq_codes: the schemas, every argument check, and the
// registration of one kernel per backend (CPU always; CUDA when CMake built csrc/cuda/; Meta for torch.compile).
//
//     lfq_quantize(Tensor z) -> Tensor               z (..., C) float32/float64/float16/bfloat16, 1 ≤ C ≤ 62
//                                                    -> (...) int64, index = Σ_c [z_c > 0] · 2^(C−1−c)
//     lfq_codes(Tensor indices, int bits) -> Tensor  indices (...) any integer dtype, each in [0, 2^bits)
//                                                    -> (..., bits) float32 of ±1, channel 0 = most significant bit
//
// The math lives in csrc/include/lfq.h, the Python entry points in hermesflow_fast/ops/lfq.py, and the test in
// tests/csrc/test_lfq.py. Every constraint of the ops is one TORCH_CHECK_VALUE line below; each raises ValueError in
// Python, naming the argument and what it got. The checks read sizes through sym_sizes() so that the Meta kernels
// run them unchanged on the symbolic shapes of torch.compile.

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "lfq.h"

namespace hermesflow_fast {

namespace {

bool is_lfq_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

void check_lfq_quantize_args(const at::Tensor& z) {
  TORCH_CHECK_VALUE(z.dim() >= 1 && is_lfq_float(z.scalar_type()),
                    "lfq_quantize: z must be a floating tensor (float32, float64, float16 or bfloat16) with at least "
                    "1 dim, got dtype=", z.scalar_type(), " shape=", z.sym_sizes());
  const c10::SymInt& channels = z.sym_size(-1);
  TORCH_CHECK_VALUE(channels >= 1 && channels <= kLfqMaxBits,
                    "lfq_quantize: z's last dim C (the bits of each index) must lie in [1, ", kLfqMaxBits,
                    "], got z of shape ", z.sym_sizes());
}

void check_lfq_codes_args(const at::Tensor& indices, int64_t bits) {
  TORCH_CHECK_VALUE(at::isIntegralType(indices.scalar_type(), /*includeBool=*/false),
                    "lfq_codes: indices must be an integer tensor, got dtype=", indices.scalar_type(),
                    " shape=", indices.sym_sizes());
  TORCH_CHECK_VALUE(bits >= 1 && bits <= kLfqMaxBits, "lfq_codes: bits must lie in [1, ", kLfqMaxBits,
                    "], got bits=", bits, " for indices of shape ", indices.sym_sizes());
  // The values of indices are checked where they are read: in the CPU kernel's loop (no extra pass). The CUDA
  // kernel does not check them, to stay free of a host sync; it reads the low `bits` bits, as the reference does.
}

// The (..., bits) float32 output of lfq_codes, for the Meta kernel and the CPU and CUDA kernels alike (sym_sizes of a
// concrete tensor are concrete).
at::Tensor empty_codes(const at::Tensor& indices, int64_t bits) {
  c10::SymDimVector sizes(indices.sym_sizes().begin(), indices.sym_sizes().end());  // (...)
  sizes.emplace_back(bits);                                                         // (..., bits)
  return at::empty_symint(sizes, indices.options().dtype(at::kFloat));
}

namespace {

// ---------------------------------------------------------------------------------------------------------------------
// Meta kernels: output shape and dtype only, on possibly symbolic sizes (FakeTensor, torch.compile, opcheck)
// ---------------------------------------------------------------------------------------------------------------------

at::Tensor lfq_quantize_meta(const at::Tensor& z) {
  const c10::SymIntArrayRef sizes = z.sym_sizes();  // (..., C)
  return at::empty_symint(sizes.slice(0, sizes.size() - 1), z.options().dtype(at::kLong));  // (...)
}

at::Tensor lfq_codes_meta(const at::Tensor& indices, int64_t bits) {
  return empty_codes(indices, bits);
}

// ---------------------------------------------------------------------------------------------------------------------
// One check in front of every backend's kernel: a backend cannot be registered without it
// ---------------------------------------------------------------------------------------------------------------------

template <at::Tensor (*Kernel)(const at::Tensor&)>
at::Tensor checked_quantize(const at::Tensor& z) {
  check_lfq_quantize_args(z);
  return Kernel(z);
}

template <at::Tensor (*Kernel)(const at::Tensor&, int64_t)>
at::Tensor checked_codes(const at::Tensor& indices, int64_t bits) {
  check_lfq_codes_args(indices, bits);
  return Kernel(indices, bits);
}

}  // namespace

// pt2_compliant_tag: the ops are functional (no aliasing, no mutation) and have Meta kernels, so torch.compile may
// put them in a graph as they are; tests/csrc/test_lfq.py holds them to that with torch.library.opcheck.
TORCH_LIBRARY(hermesflow_fast, m) {
  m.def("lfq_quantize(Tensor z) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("lfq_codes(Tensor indices, int bits) -> Tensor", {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(hermesflow_fast, CPU, m) {
  m.impl("lfq_quantize", &checked_quantize<lfq_quantize_cpu>);
  m.impl("lfq_codes", &checked_codes<lfq_codes_cpu>);
}

TORCH_LIBRARY_IMPL(hermesflow_fast, Meta, m) {
  m.impl("lfq_quantize", &checked_quantize<lfq_quantize_meta>);
  m.impl("lfq_codes", &checked_codes<lfq_codes_meta>);
}

#if defined(HFF_WITH_CUDA)
TORCH_LIBRARY_IMPL(hermesflow_fast, CUDA, m) {
  m.impl("lfq_quantize", &checked_quantize<lfq_quantize_cuda>);
  m.impl("lfq_codes", &checked_codes<lfq_codes_cuda>);
}
#endif

}  // namespace hermesflow_fast
