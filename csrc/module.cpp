// hermesflow_fast._C: the Python module that carries the native ops.
//
// Importing it (hermesflow_fast/_native.py does, after `import torch`) loads this shared library, whose static
// TORCH_LIBRARY / TORCH_LIBRARY_IMPL blocks (csrc/lfq.cpp) register the ops as torch.ops.hermesflow_fast.*. The module
// itself needs no functions, only two attributes that say what was built, for `hermesflow env` and for the dispatch
// in hermesflow_fast/ops/:
//     _C.build_info     "cpu" or "cpu,cuda": the backends compiled in
//     _C.torch_version  the torch the extension was compiled against (an ABI mismatch shows up as an import error)
// Plain CPython API, no pybind11: nothing here needs it, and it keeps libtorch_python out of the link.

#include <Python.h>

#if defined(HFF_WITH_CUDA)
#define HFF_BUILD_INFO "cpu,cuda"
#else
#define HFF_BUILD_INFO "cpu"
#endif

#ifndef HFF_TORCH_VERSION
#define HFF_TORCH_VERSION "unknown"
#endif

namespace {

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "hermesflow_fast._C",
    "Native LFQ ops of hermesflow_fast, registered as torch.ops.hermesflow_fast.* (csrc/).",
    -1,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) {
    return nullptr;
  }
  if (PyModule_AddStringConstant(module, "build_info", HFF_BUILD_INFO) < 0 ||
      PyModule_AddStringConstant(module, "torch_version", HFF_TORCH_VERSION) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
