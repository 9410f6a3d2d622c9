"""Shared helpers of ``bench/``: timing quantiles, peak memory, machine/commit stamps and the CSV row format.

    do_bench(fn, warmup, rep, setup=...)  -> (median, q20, q80) seconds of fn()
    PeakMemory(device)                    -> context manager; .growth = peak bytes above the level at entry
    append_rows(path, rows)               -> one append-only CSV per script, Liger's columns plus ours

Peak memory.
  CUDA: ``reset_peak_memory_stats`` at entry, ``max_memory_allocated() − memory_allocated()@entry`` at exit.
  CPU: there is no allocator counter, so we read the kernel's: at entry write "5" to /proc/self/clear_refs (resets
  VmHWM to the current RSS) and read VmRSS; at exit read VmHWM. For RSS to track live tensors, the process must
  start with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc then mmaps every buffer ≥ 64 KiB and returns it on free);
  ``bench_logprobs`` runs each (provider, size) in a fresh process with that variable set (see ``worker_env``).
  Where clear_refs is not writable, VmHWM cannot be reset: the measurement must then be the first run after the
  inputs are built, in a fresh process (``can_reset_cpu_peak()`` tells the caller which case it is in).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import gc
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
PLOTS_DIR = ROOT / "bench" / "plots"

CSV_COLUMNS = (
    "kernel_name",
    "kernel_provider",
    "kernel_operation_mode",
    "metric_name",
    "metric_unit",
    "x_name",
    "x_value",
    "y_value_50",
    "y_value_20",
    "y_value_80",
    "extra_benchmark_config_str",
    "machine",
    "device_name",
    "dtype",
    "torch_version",
    "commit",
    "timestamp",
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MB = 2**20

# ---------------------------------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------------------------------


def set_threads(threads: int | None) -> int:
    """``torch.set_num_threads(threads or all cores)``; returns the count in use."""
    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def worker_env(threads: int | None = None, track_rss: bool = True) -> dict[str, str]:
    """Environment of a fresh measurement process, repo importable. ``track_rss``: big buffers mmap'd, so RSS follows
    live memory (every large allocation then costs fresh page faults: time such a process only where that is what
    is measured; ``bench_step`` times in a second process with glibc's defaults)."""
    env = dict(os.environ)
    if track_rss:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), q in [0, 1]."""
    if not values:
        raise ValueError("quantile of no values")
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def do_bench(
    fn: Callable[[], object],
    warmup: int = 1,
    rep: int = 3,
    quantiles: Sequence[float] = (0.5, 0.2, 0.8),
    setup: Callable[[], object] | None = None,
    device: torch.device | str = "cpu",
    first_call_ctx: contextlib.AbstractContextManager | None = None,
) -> tuple[float, ...]:
    """Seconds per call of ``fn`` at ``quantiles`` over ``rep`` timed calls, after ``warmup`` untimed ones.

    ``setup()`` runs before every call, outside the timed region (e.g. dropping ``.grad`` so each call starts from
    the same state). CUDA: timed with events around the call, after a sync; CPU: wall clock. Few reps are fine on
    CPU, where one full-size call takes seconds: with rep=3 the q20/q80 are interpolated between the 3 samples.
    ``first_call_ctx`` (e.g. a ``PeakMemory``) wraps the first timed call, so measuring memory costs no extra call.
    """
    if rep < 1:
        raise ValueError(f"rep must be >= 1, got {rep}")
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    sync(device)
    times = []
    for i in range(rep):
        if setup is not None:
            setup()
        ctx = first_call_ctx if (i == 0 and first_call_ctx is not None) else contextlib.nullcontext()
        with ctx:
            times.append(_time_one(fn, cuda))
    return tuple(quantile(times, q) for q in quantiles)


def _time_one(fn: Callable[[], object], cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    if m is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(m.group(1)) * 1024


def rss_bytes() -> int:
    return _status_kb("VmRSS")


def hwm_bytes() -> int:
    return _status_kb("VmHWM")


def reset_cpu_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where /proc/self/clear_refs is not writable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def can_reset_cpu_peak() -> bool:
    return os.path.exists("/proc/self/clear_refs") and os.access("/proc/self/clear_refs", os.W_OK)


class PeakMemory:
    """``with PeakMemory(device) as pm: work()`` then ``pm.growth``: peak bytes above the level at entry.

    CPU: VmHWM − VmRSS@entry (VmHWM reset at entry when possible, see the module docstring; ``pm.reset`` says
    whether it was). CUDA: max_memory_allocated − memory_allocated@entry (tensors only, not the caching slack).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.growth = 0
        self.reset = True

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.reset = reset_cpu_peak()
            self.base = rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.growth = torch.cuda.max_memory_allocated() - self.base
        else:
            self.growth = hwm_bytes() - self.base


def available_bytes(device: torch.device | str = "cpu") -> int:
    """Memory a new allocation can still get: MemAvailable on CPU, free device memory on CUDA."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        m = re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) * 1024 if m else 0


# ---------------------------------------------------------------------------------------------------------------------
# stamps
# ---------------------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> str:
    """``hostname | CPU model | N cores``."""
    return f"{socket.gethostname()} | {cpu_model()} | {os.cpu_count()} cores"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def git_commit() -> str:
    """Short SHA of HEAD, ``-dirty`` when tracked files differ from it (untracked files do not count); or unknown.
    ``HFF_COMMIT`` overrides it (a copy of the tree without its ``.git``, e.g. on a remote GPU machine)."""
    if os.environ.get("HFF_COMMIT"):
        return os.environ["HFF_COMMIT"]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(  # the results this bench appends to do not make the code dirty
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results", ":!bench/plots"],
            cwd=ROOT, capture_output=True, text=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------------------------------


def make_row(
    *,
    kernel_name: str,
    provider: str,
    metric: str,
    unit: str,
    x_name: str,
    x_value: float,
    y: Sequence[float],
    config: dict,
    device: torch.device | str,
    dtype: str,
    mode: str = "full",
    stamps: dict | None = None,
) -> dict:
    """One CSV row; ``y`` = (median, q20, q80). ``stamps`` (machine/commit/...) can be computed once per run."""
    stamps = stamps or run_stamps(device)
    y50, y20, y80 = (list(y) + [y[0], y[0]])[:3]
    return {
        "kernel_name": kernel_name,
        "kernel_provider": provider,
        "kernel_operation_mode": mode,
        "metric_name": metric,
        "metric_unit": unit,
        "x_name": x_name,
        "x_value": x_value,
        "y_value_50": y50,
        "y_value_20": y20,
        "y_value_80": y80,
        "extra_benchmark_config_str": json.dumps(config, sort_keys=True),
        "dtype": dtype,
        **stamps,
    }


def run_stamps(device: torch.device | str) -> dict:
    """The columns shared by every row of one run."""
    return {
        "machine": machine_info(),
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "commit": git_commit(),
        "timestamp": timestamp(),
    }


def append_rows(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Append rows to the CSV at ``path`` (created with its header, and parent dirs, when missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != CSV_COLUMNS:
            raise ValueError(f"{path} has columns {header}, expected {list(CSV_COLUMNS)}: write to another --out")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            w.writeheader()
        for row in rows:
            w.writerow(row)
    return path


def read_rows(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------------------------------
# fresh-process workers (CPU memory is measured as the peak RSS of a process that did nothing else)
# ---------------------------------------------------------------------------------------------------------------------
RESULT_TAG = "@@RESULT "


def run_worker(module: str, spec: dict, threads: int | None, timeout: float | None, what: str,
               track_rss: bool = True) -> dict:
    """Run ``python -m <module> --worker <spec json>`` and return the dict its worker printed after RESULT_TAG."""
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, cwd=ROOT, env=worker_env(threads, track_rss), capture_output=True, text=True,
                          timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    why = f"killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0 else f"rc={proc.returncode}"
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
    raise RuntimeError(f"worker for {what} failed, {why}:\n{tail}")


def worker_main(spec_json: str, measure: Callable[..., dict], problem_type: type) -> None:
    """The worker side of ``run_worker``: rebuild the problem, measure, print the result line."""
    spec = json.loads(spec_json)
    set_threads(spec["threads"])
    r = measure(problem_type(**spec["problem"]), spec["provider"], spec["reps"], spec["warmup"])
    print(RESULT_TAG + json.dumps(r), flush=True)


@contextlib.contextmanager
def stage_timer(stages: dict[str, float], name: str, device: torch.device | str):
    """Adds the seconds of the ``with`` body (the device synced at its end) to ``stages[name]``."""
    t0 = time.perf_counter()
    yield
    sync(device)
    stages[name] = stages.get(name, 0.0) + time.perf_counter() - t0


def profile_table(fn: Callable[[], object], device: torch.device | str, rows: int = 25) -> str:
    """``fn()`` once under torch.profiler (CPU, plus CUDA on a CUDA device): the top ops by self time, as a table."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = torch.device(device).type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=acts) as prof:
        fn()
        sync(device)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=48)
