"""Timing quantiles, peak memory and thread settings of the benchmark harness.

    do_bench(fn, warmup, rep, setup=...)  -> (median, q20, q80) seconds of fn()
    time_and_memory(fn, device, ...)      -> do_bench's quantiles and the peak-memory growth of one of the calls
    PeakMemory(device)                    -> context manager; .growth = peak bytes above the level at entry

Peak memory.
  CUDA: ``reset_peak_memory_stats`` at entry, ``max_memory_allocated() − memory_allocated()@entry`` at exit.
  CPU: there is no allocator counter, so we read the kernel's: at entry write "5" to /proc/self/clear_refs (resets
  VmHWM to the current RSS) and read VmRSS; at exit read VmHWM. For RSS to track live tensors, the process must
  start with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc then mmaps every buffer ≥ 64 KiB and returns it on free); the
  harness runs each (provider, point) of a fresh-process sweep in its own process with that variable set
  (``harness.worker_env``). Where clear_refs is not writable, VmHWM cannot be reset: the measurement must then be the
  first run after the inputs are built, in a fresh process (``can_reset_cpu_peak()`` tells which case it is).
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import time
from collections.abc import Callable, Sequence

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MB = 2**20

__all__ = [
    "DTYPES", "MB", "PeakMemory", "available_bytes", "can_reset_cpu_peak", "do_bench", "hwm_bytes", "profile_table",
    "quantile", "reset_cpu_peak", "rss_bytes", "set_threads", "stage_timer", "sync", "time_and_memory",
]


def set_threads(threads: int | None) -> int:
    """``torch.set_num_threads(threads or all cores)``; returns the count in use."""
    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


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


def time_and_memory(
    fn: Callable[[], object],
    device: torch.device | str,
    reps: int,
    warmup: int = 1,
    setup: Callable[[], object] | None = None,
    memory: bool = True,
) -> tuple[tuple[float, ...], PeakMemory | None]:
    """``do_bench`` quantiles of ``fn`` and, with ``memory``, a ``PeakMemory`` of one call after the warm-up.

    Where VmHWM can be reset (or on CUDA) the first timed call is measured. Where it cannot, the peak must be that of
    the first call after the inputs were built (in a fresh process): that call is made untimed, before the rest of
    the warm-up."""
    if not memory:
        return do_bench(fn, warmup=warmup, rep=reps, setup=setup, device=device), None
    pm = PeakMemory(device)
    if torch.device(device).type == "cpu" and not can_reset_cpu_peak():
        if setup is not None:
            setup()
        with pm:
            fn()
        return do_bench(fn, warmup=max(0, warmup - 1), rep=reps, setup=setup, device=device), pm
    return do_bench(fn, warmup=warmup, rep=reps, setup=setup, device=device, first_call_ctx=pm), pm


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
