// hermesflow_fast::nearest_code: the schema, every argument check, and the registration of one kernel per backend
// (CPU always; CUDA when CMake built csrc/cuda/; Meta for torch.compile).
//
//     nearest_code(Tensor x, Tensor codebook) -> Tensor   x (N, D), codebook (K, D), 1 ≤ K < 2^31, one dtype of
//                                                         float32/float64/float16/bfloat16, one device
//                                                         -> (N,) int64, argmin_k ||c_k||² − 2 ⟨x_n, c_k⟩
//
// The definition lives in csrc/include/nearest_code.h, the Python entry point in hermesflow_fast/ops/nearest_code.py,
// and the test in tests/csrc/test_nearest_code.py. The namespace's one TORCH_LIBRARY block is in csrc/lfq.cpp; this
// file adds its op with a TORCH_LIBRARY_FRAGMENT. Every constraint of the op is one TORCH_CHECK_VALUE line below;
// each raises ValueError in Python, naming the argument and what it got. The checks read sizes through sym_sizes()
// so that the Meta kernel runs them unchanged on the symbolic shapes of torch.compile.

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "nearest_code.h"

namespace hermesflow_fast {

namespace {

bool is_nearest_code_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

void check_nearest_code_args(const at::Tensor& x, const at::Tensor& codebook) {
  TORCH_CHECK_VALUE(x.dim() == 2 && is_nearest_code_float(x.scalar_type()),
                    "nearest_code: x must be a 2-D (N, D) floating tensor (float32, float64, float16 or bfloat16), "
                    "got dtype=", x.scalar_type(), " shape=", x.sym_sizes());
  TORCH_CHECK_VALUE(codebook.dim() == 2 && is_nearest_code_float(codebook.scalar_type()),
                    "nearest_code: codebook must be a 2-D (K, D) floating tensor (float32, float64, float16 or "
                    "bfloat16), got dtype=", codebook.scalar_type(), " shape=", codebook.sym_sizes());
  TORCH_CHECK_VALUE(x.sym_size(1) == codebook.sym_size(1),
                    "nearest_code: x (N, D) and codebook (K, D) must have the same D, got x of shape ", x.sym_sizes(),
                    " and codebook of shape ", codebook.sym_sizes());
  TORCH_CHECK_VALUE(x.scalar_type() == codebook.scalar_type(),
                    "nearest_code: x and codebook must have the same dtype, got x ", x.scalar_type(),
                    " and codebook ", codebook.scalar_type());
  TORCH_CHECK_VALUE(x.device() == codebook.device(),
                    "nearest_code: x and codebook must be on the same device, got x on ", x.device(),
                    " and codebook on ", codebook.device());
  const c10::SymInt& codes = codebook.sym_size(0);
  TORCH_CHECK_VALUE(codes >= 1 && codes <= kNearestCodeMaxCodes, "nearest_code: codebook must have between 1 and ",
                    kNearestCodeMaxCodes, " rows (K), got shape ", codebook.sym_sizes());
}

namespace {

// ---------------------------------------------------------------------------------------------------------------------
// Meta kernel: output shape and dtype only, on possibly symbolic sizes (FakeTensor, torch.compile, opcheck)
// ---------------------------------------------------------------------------------------------------------------------

at::Tensor nearest_code_meta(const at::Tensor& x, const at::Tensor& /*codebook*/) {
  return at::empty_symint({x.sym_size(0)}, x.options().dtype(at::kLong));  // (N,)
}

// ---------------------------------------------------------------------------------------------------------------------
// One check in front of every backend's kernel: a backend cannot be registered without it
// ---------------------------------------------------------------------------------------------------------------------

template <at::Tensor (*Kernel)(const at::Tensor&, const at::Tensor&)>
at::Tensor checked_nearest_code(const at::Tensor& x, const at::Tensor& codebook) {
  check_nearest_code_args(x, codebook);
  return Kernel(x, codebook);
}

}  // namespace

// pt2_compliant_tag: the op is functional (no aliasing, no mutation) and has a Meta kernel, so torch.compile may put
// it in a graph as it is; tests/csrc/test_nearest_code.py holds it to that with torch.library.opcheck.
TORCH_LIBRARY_FRAGMENT(hermesflow_fast, m) {
  m.def("nearest_code(Tensor x, Tensor codebook) -> Tensor", {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(hermesflow_fast, CPU, m) {
  m.impl("nearest_code", &checked_nearest_code<nearest_code_cpu>);
}

TORCH_LIBRARY_IMPL(hermesflow_fast, Meta, m) {
  m.impl("nearest_code", &checked_nearest_code<nearest_code_meta>);
}

#if defined(HFF_WITH_CUDA)
TORCH_LIBRARY_IMPL(hermesflow_fast, CUDA, m) {
  m.impl("nearest_code", &checked_nearest_code<nearest_code_cuda>);
}
#endif

}  // namespace hermesflow_fast
