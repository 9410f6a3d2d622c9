"""Compile-check the CUDA sources of hermesflow_fast._C with nvcc, on a machine with no GPU and a CPU build of torch.

setup.py builds csrc/cuda/ only where nvcc and a CUDA torch meet, so without this test a CPU-only CI would never see
a .cu file compile. It reads the source list, C++ standard and defines from the block of CMakeLists.txt marked
"parsed by tests/csrc/test_cuda_compile.py" (one list, no second copy here), then compiles each .cu to an object
file for sm_90 against torch's headers, as CMake would. Skipped when nvcc is not on PATH.

    .venv/bin/python -m pytest -q tests/csrc/test_cuda_compile.py
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import include_paths

ROOT = Path(__file__).resolve().parents[2]
NVCC = shutil.which("nvcc")
ARCH = "arch=compute_90,code=sm_90"  # H100; one arch keeps the compile near 45 s on 2 cores


def cmake_parsed_block() -> dict[str, list[str]]:
    """{variable: items} of every `set(...)` in CMakeLists.txt's parsed block, comments stripped."""
    lines = (ROOT / "CMakeLists.txt").read_text().splitlines()
    marker = "parsed by tests/csrc/test_cuda_compile.py"
    begin = next(i for i, line in enumerate(lines) if f"{marker}: begin" in line)
    end = next(i for i, line in enumerate(lines) if f"{marker}: end" in line)
    block = "\n".join(line.split("#", 1)[0] for line in lines[begin + 1 : end])
    return {name: body.split() for name, body in re.findall(r"\bset\((\w+)\s+([^)]*)\)", block)}


CMAKE = cmake_parsed_block()
CUDA_SOURCES = CMAKE.get("HFF_CUDA_SOURCES", [])


def test_cmake_lists_every_cuda_source():
    assert CUDA_SOURCES, "CMakeLists.txt's HFF_CUDA_SOURCES is empty or unreadable"
    on_disk = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc" / "cuda").rglob("*.cu"))
    assert sorted(CUDA_SOURCES) == on_disk, "HFF_CUDA_SOURCES in CMakeLists.txt and csrc/cuda/*.cu disagree"
    assert CMAKE.get("CMAKE_CXX_STANDARD"), "CMAKE_CXX_STANDARD must be set in the parsed block"


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH (no CUDA toolkit here)")
@pytest.mark.parametrize("source", CUDA_SOURCES)
def test_nvcc_compiles(source, tmp_path):
    obj = tmp_path / (Path(source).stem + ".o")
    includes = [*include_paths(), sysconfig.get_paths()["include"], str(ROOT / "csrc" / "include")]
    cmd = [
        NVCC, "-c", str(ROOT / source), "-o", str(obj),
        f"-std=c++{CMAKE['CMAKE_CXX_STANDARD'][0]}", "-gencode", ARCH, "-Xcompiler", "-fPIC",
        "-DHFF_WITH_CUDA", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *(f"-D{define}" for define in CMAKE.get("HFF_CUDA_DEFINES", [])),
        *(f"-I{path}" for path in includes),
    ]
    version = subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"nvcc ({version}) failed on {source}:\n{' '.join(cmd)}\n{result.stderr}"
    assert obj.stat().st_size > 0
    if result.stderr.strip():
        print(f"nvcc warnings on {source}:\n{result.stderr}")
