"""The native extension hermesflow_fast._C, if it was built: loaded once, at import of this module, never fatally.

Built by setup.py from CMakeLists.txt and csrc/ (`pip install --no-build-isolation -e .`), the extension registers
its ops as ``torch.ops.hermesflow_fast.*`` and states which backends it was compiled with in ``_C.build_info``
("cpu" or "cpu,cuda"). When it is missing, or fails to load (no compiler at install time, a torch upgraded since
the build), every op in ``hermesflow_fast.ops`` takes its plain-torch path from ``ops/reference.py`` and says so once.

    has_extension()      the extension loaded
    extension_error()    why it did not load, for `hermesflow env` and the fallback notice
    has_cuda_kernels()   the CUDA kernels were compiled in
    has_kernel(device)   the extension can run an op on tensors of this device (what ops/ dispatch on)
"""

from __future__ import annotations

import importlib

import torch  # libtorch must be loaded (and its ops library ready) before _C registers into it

BUILD_HINT = "build the extension with `pip install --no-build-isolation -e .` (needs a C++ compiler and cmake)"


def _load() -> tuple[object | None, str | None]:
    try:
        return importlib.import_module("hermesflow_fast._C"), None
    except Exception as e:  # ImportError when not built; OSError/ImportError on an ABI mismatch: all non-fatal
        return None, f"{type(e).__name__}: {e}"


_C, _ERROR = _load()
_BACKENDS = frozenset(getattr(_C, "build_info", "").split(",")) - {""}


def has_extension() -> bool:
    """True when ``hermesflow_fast._C`` loaded and its ops are registered with torch."""
    return _C is not None


def extension_error() -> str | None:
    """Why the extension did not load (the exception, one line), or None when it did."""
    return _ERROR


def has_cuda_kernels() -> bool:
    """True when the loaded extension was compiled with its CUDA kernels (nvcc and a CUDA torch at build time)."""
    return "cuda" in _BACKENDS


def build_info() -> str:
    """One line for `hermesflow env`: the backends and torch version of the build, or why there is none."""
    if _C is None:
        return f"not loaded ({_ERROR}); {BUILD_HINT}"
    return f"{','.join(sorted(_BACKENDS))} (built against torch {getattr(_C, 'torch_version', 'unknown')})"


def has_kernel(device: torch.device) -> bool:
    """True when ``torch.ops.hermesflow_fast.*`` can run on tensors of ``device``.

    "meta" counts: the extension registers Meta kernels, which FakeTensor and torch.compile trace through.
    """
    if device.type in ("cpu", "meta"):
        return "cpu" in _BACKENDS
    if device.type == "cuda":
        return "cuda" in _BACKENDS
    return False
