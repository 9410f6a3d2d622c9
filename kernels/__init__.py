"""Triton kernels (CUDA), one op per file, imported as ``hermesflow_fast.kernels``. Importing it never needs Triton.

This folder sits at the repository root, so wherever the root is on ``sys.path`` (``python -m`` or pytest from a
checkout, a subprocess started with ``cwd`` at the root) Python also finds it as a top-level ``kernels``, the name of
Hugging Face's ``kernels`` package that transformers imports. Under any name but its own this file does not stand
in: it loads the next ``kernels`` on the path in its place, or fails as if this folder were not there.
"""

if __name__ != "hermesflow_fast.kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _here = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _rest = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _here]
    _spec = _machinery.PathFinder.find_spec(__name__, _rest)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = _util.module_from_spec(_spec)
    _sys.modules[__name__] = _module  # the import statement returns what sys.modules holds once this file has run
    _spec.loader.exec_module(_module)
