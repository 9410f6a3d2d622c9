"""Install hermesflow_fast and build its native extension hermesflow_fast._C from CMakeLists.txt.

    pip install setuptools wheel cmake && pip install --no-build-isolation -e ".[dev]"     # what `make install` runs

The extension is optional. Its CPU kernels are always built (against a CUDA build of torch that takes a CUDA toolkit:
torch's CMake config insists); its CUDA kernels when nvcc and a CUDA torch are both found, else one line says why
not. A failed build prints a warning and the install goes on: hermesflow_fast then runs its torch fallbacks and says
so once. Knobs, read from the environment at build time:

    MAX_JOBS=N             parallel compile jobs. Default: min(CPUs, free RAM / 2 GiB), printed with a hint
                           (measured peaks over torch's headers: 0.6 GiB for a g++ unit, 1.0 GiB for the nvcc one).
    TORCH_CUDA_ARCH_LIST   GPU archs, torch's syntax: "8.0;9.0", "9.0a", "8.6+PTX". Default: the archs of the GPUs
                           visible at build time, else torch's own default list (slower to build).
    HFF_SKIP_CUDA_BUILD=1  build the CPU kernels only, even where the CUDA kernels could be built.
    HFF_FORCE_CUDA=1       fail the install unless the CUDA kernels build (GPU images, GPU CI).
    HFF_FORCE_EXT=1        fail the install unless the extension builds (CI), instead of warning.
    HFF_SKIP_EXT=1         build no extension at all: a pure-Python install on the torch fallbacks.
    DEBUG=1                debug build: CMAKE_BUILD_TYPE=Debug, i.e. -O0 -g.
    CMAKE_ARGS="..."       extra arguments for the cmake configure step, e.g. "-DCMAKE_CXX_COMPILER=clang++".

CMakeLists.txt is the only list of sources and flags; this file finds torch (torch.utils.cmake_prefix_path), picks
the knobs, then runs `cmake -S . -B build/cmake-*` and `cmake --build`. The build tree is kept, so a rebuild
recompiles only what changed. The module lands where setuptools expects it (build/lib.*/hermesflow_fast/), which
setuptools copies into the source tree for an editable install and into the wheel otherwise.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = Path(__file__).resolve().parent


def say(message: str) -> None:
    print(f"hermesflow_fast: {message}", flush=True)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------------------------------------------------------
# Tools and knobs
# ---------------------------------------------------------------------------------------------------------------------


def find_cmake() -> str | None:
    """The pip `cmake` package first (the Makefile installs it), then cmake on PATH."""
    try:
        import cmake

        path = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    return shutil.which("cmake")


def find_nvcc() -> str | None:
    """$CUDA_HOME/bin/nvcc (or $CUDA_PATH), then nvcc on PATH, then /usr/local/cuda/bin/nvcc."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def nvcc_version(nvcc: str) -> str | None:
    """'13.0' from `nvcc --version`, or None when it cannot be run or read."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def cuda_plan(torch, nvcc: str | None) -> str:
    """"" when the CUDA kernels can be built with `nvcc`, else why not (one line)."""
    if env_flag("HFF_SKIP_CUDA_BUILD"):
        return "HFF_SKIP_CUDA_BUILD=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build (torch.version.cuda is None)"
    if nvcc is None:
        return "no nvcc found (looked in $CUDA_HOME/bin, on PATH and in /usr/local/cuda/bin)"
    version = nvcc_version(nvcc)
    if version is None:
        return f"{nvcc} --version failed"
    if version.split(".")[0] != torch.version.cuda.split(".")[0]:
        return (
            f"{nvcc} is CUDA {version} but torch was built with CUDA {torch.version.cuda}; "
            "point CUDA_HOME at a toolkit of the same major version"
        )
    return ""


def cuda_arch_list(torch) -> str | None:
    """TORCH_CUDA_ARCH_LIST as given, else the visible GPUs' archs, else None (torch's cmake picks its default)."""
    given = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if given:
        return given
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    say("TORCH_CUDA_ARCH_LIST is not set and no GPU is visible: torch's default arch list is used (slower build); "
        "set e.g. TORCH_CUDA_ARCH_LIST=9.0 for an H100")
    return None


def free_ram_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20  # kB -> GiB
    except OSError:
        pass
    return None


def build_jobs() -> int:
    """MAX_JOBS, else min(CPUs, free RAM / 2 GiB), said with a hint."""
    if os.environ.get("MAX_JOBS", "").strip():
        return max(1, int(os.environ["MAX_JOBS"]))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    free = free_ram_gib()
    jobs = cpus if free is None else max(1, min(cpus, int(free / 2)))
    ram = "unknown free RAM" if free is None else f"{free:.1f} GiB free RAM at ~2 GiB a job"
    say(f"MAX_JOBS is not set: {jobs} parallel compile jobs ({cpus} CPUs, {ram}); set MAX_JOBS=N to change it")
    return jobs


def cmake_build_dir(torch, fallback: Path) -> Path:
    """build/cmake-<python>-torch<version>/ in the source tree, kept between builds so a rebuild only recompiles what
    changed (pip's editable builds get a fresh temporary build_temp each time); `fallback` if the tree is read-only.
    Keyed on the interpreter and torch version: either change means a new ABI and a fresh tree."""
    name = f"cmake-{sys.implementation.cache_tag}-torch{torch.__version__.replace('+', '_')}"
    try:
        path = ROOT / "build" / name
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError:
        return fallback.resolve() / "cmake"


# ---------------------------------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------------------------------


def run_step(what: str, cmd: list[str], env: dict[str, str]) -> None:
    """Run one build command, its output streaming to the build log; a failure becomes a one-line CompileError."""
    try:
        subprocess.run(cmd, check=True, env=env)
    except subprocess.CalledProcessError as e:
        raise CompileError(f"{what} failed with exit code {e.returncode}; its output is above") from e
    except OSError as e:
        raise CompileError(f"{what} could not start: {e}") from e


class CMakeExtension(Extension):
    """An extension whose sources CMakeLists.txt lists; setuptools only knows its module name."""

    def __init__(self, name: str, optional: bool) -> None:
        super().__init__(name, sources=[], optional=optional)


class CMakeBuild(build_ext):
    """build_ext that configures and builds CMakeLists.txt, writing the module to setuptools' output path."""

    def build_extension(self, ext: Extension) -> None:
        try:
            self.run_cmake(ext)
        except (CompileError, OSError) as e:
            # setuptools swallows a CompileError of an optional extension (with its own warning) and raises it
            # for a required one (HFF_FORCE_EXT=1 / HFF_FORCE_CUDA=1).
            if ext.optional:
                say(f"WARNING: hermesflow_fast._C was not built ({e}). The install goes on without it and "
                    "hermesflow_fast runs its torch fallbacks. `pip install -v ...` shows the compiler output; "
                    "HFF_FORCE_EXT=1 makes this an error.")
            raise CompileError(str(e)) from e

    def run_cmake(self, ext: Extension) -> None:
        try:
            import torch
            import torch.utils
        except ImportError as e:
            raise CompileError(f"torch is not importable ({e}); install torch first, then build with "
                               "--no-build-isolation") from e
        cmake = find_cmake()
        if cmake is None:
            raise CompileError("no cmake found; `pip install cmake`")

        nvcc = find_nvcc()
        if torch.version.cuda is not None and nvcc is None:
            # find_package(Torch) of a CUDA torch enables the CUDA language and stops without a toolkit, CPU-only
            # target or not (pip's CUDA wheels bring the CUDA runtime, not nvcc).
            raise CompileError(
                f"torch {torch.__version__} is a CUDA build, whose CMake config needs a CUDA toolkit, and no nvcc "
                f"was found ($CUDA_HOME/bin, PATH, /usr/local/cuda/bin); install a CUDA {torch.version.cuda} "
                "toolkit or set CUDA_HOME"
            )
        why_not = cuda_plan(torch, nvcc)
        if why_not:
            if env_flag("HFF_FORCE_CUDA"):
                raise CompileError(f"HFF_FORCE_CUDA=1 but the CUDA kernels cannot be built: {why_not}")
            say(f"CUDA kernels skipped: {why_not}. Building the CPU kernels only.")
            nvcc = None

        output = Path(self.get_ext_fullpath(ext.name)).resolve()  # .../hermesflow_fast/_C.cpython-311-....so
        build_dir = cmake_build_dir(torch, Path(self.build_temp))
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if env_flag('DEBUG') else 'Release'}",
            f"-DHFF_WITH_CUDA={'ON' if nvcc else 'OFF'}",
            f"-DHFF_OUTPUT_DIR={output.parent}",
            f"-DHFF_EXT_SUFFIX={output.name.removeprefix('_C')}",
        ]
        env = dict(os.environ)
        if nvcc:
            configure.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
            arch = cuda_arch_list(torch)
            if arch:
                env["TORCH_CUDA_ARCH_LIST"] = arch  # read by torch's cmake (it ignores CMAKE_CUDA_ARCHITECTURES)
                say(f"CUDA archs: {arch}")
        ninja = shutil.which("ninja")
        if ninja and not (build_dir / "CMakeCache.txt").exists():  # a build tree keeps the generator it began with
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        configure += shlex.split(os.environ.get("CMAKE_ARGS", ""))

        say(f"building {ext.name} with CMake (torch {torch.__version__}, CUDA {'on' if nvcc else 'off'})")
        try:
            run_step("cmake configure", configure, env)
        except CompileError:
            # A failed configure leaves a cache that pins what failed (a missing compiler, say) for every later try.
            shutil.rmtree(build_dir, ignore_errors=True)
            raise
        run_step("cmake --build", [cmake, "--build", str(build_dir), "--parallel", str(build_jobs())], env)
        if not output.exists():
            raise CompileError(f"cmake finished but {output} is missing")


# ---------------------------------------------------------------------------------------------------------------------
# Packages: hermesflow_fast and every subpackage under it, plus the top-level kernels/ as hermesflow_fast.kernels
# ---------------------------------------------------------------------------------------------------------------------

PACKAGES = [
    "hermesflow_fast",
    *(f"hermesflow_fast.{p}" for p in find_packages("hermesflow_fast", exclude=["kernels", "kernels.*"])),
    "hermesflow_fast.kernels",
    *(f"hermesflow_fast.kernels.{p}" for p in find_packages("kernels")),
]

if env_flag("HFF_SKIP_EXT"):
    say("HFF_SKIP_EXT=1: not building hermesflow_fast._C; the torch fallbacks will run")
    EXT_MODULES = []
else:
    required = env_flag("HFF_FORCE_EXT") or env_flag("HFF_FORCE_CUDA")
    EXT_MODULES = [CMakeExtension("hermesflow_fast._C", optional=not required)]

setup(
    packages=PACKAGES,
    package_dir={"hermesflow_fast": "hermesflow_fast", "hermesflow_fast.kernels": "kernels"},
    ext_modules=EXT_MODULES,
    cmdclass={"build_ext": CMakeBuild},
)
