"""The repository's kernels/ folder is ``hermesflow_fast.kernels`` only: from a checkout's root (where Python also
finds it as a top-level ``kernels``) it never shadows Hugging Face's ``kernels`` package, which transformers imports."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run_at_root(code: str) -> subprocess.CompletedProcess:
    # `python -c` puts the working directory first on sys.path, as `python -m` and pytest from the root do
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_our_kernels_keep_their_own_name():
    proc = _run_at_root("import hermesflow_fast.kernels as k, hermesflow_fast.kernels.linear_logprobs; "
                        "print(k.__name__, k.__file__)")
    assert proc.returncode == 0, proc.stderr
    name, file = proc.stdout.split()
    assert name == "hermesflow_fast.kernels" and Path(file).resolve() == ROOT / "kernels" / "__init__.py"


@pytest.mark.skipif(not _hf_kernels_installed(), reason="Hugging Face's kernels package is not installed")
def test_top_level_kernels_is_hugging_faces_package_and_phi_imports():
    proc = _run_at_root("import kernels; print(kernels.__file__); from kernels import CUDAProperties; "
                        "from transformers import PhiForCausalLM; print(PhiForCausalLM.__name__)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    file, phi = proc.stdout.split()
    assert "site-packages" in Path(file).parts and (ROOT / "kernels") not in Path(file).resolve().parents
    assert phi == "PhiForCausalLM"


@pytest.mark.skipif(_hf_kernels_installed(), reason="Hugging Face's kernels package is installed")
def test_top_level_kernels_is_missing_without_hugging_faces_package():
    proc = _run_at_root("import kernels")
    assert proc.returncode != 0 and "No module named 'kernels'" in proc.stderr
