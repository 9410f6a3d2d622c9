"""The native extension must load where it was built: a broken build must not pass as a quiet torch fallback."""

import os

import pytest

from hermesflow_fast import _native


@pytest.mark.skipif(os.environ.get("HFF_SKIP_EXT") == "1", reason="HFF_SKIP_EXT=1: a pure-Python install")
def test_extension_loads():
    assert _native.has_extension(), f"hermesflow_fast._C did not load: {_native.extension_error()}"
    assert _native.has_kernel(__import__("torch").device("cpu"))
