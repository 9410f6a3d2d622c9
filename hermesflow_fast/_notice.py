"""Say a thing once per process: used when a fast path is missing and a fallback is taken."""

from __future__ import annotations

import warnings

_said: set[str] = set()


class FallbackWarning(UserWarning):
    """A fast path (Triton, the C++/CUDA extension, flash-attn, ...) is missing and a torch fallback runs."""


def say_once(key: str, message: str) -> None:
    """Warn with ``message`` the first time ``key`` is seen in this process, never again."""
    if key in _said:
        return
    _said.add(key)
    warnings.warn(message, FallbackWarning, stacklevel=3)
