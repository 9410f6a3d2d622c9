"""The benchmark harness: a benchmark declares its problem, its providers and its sweep; the harness does the rest.

    SWEEP = Sweep(name="dpo", module=__name__, doc=__doc__, kernel="dpo_loss",
                  axes=[Axis("pairs", (8, 64, 512), "pairs per call")], providers=("reference", "ours"),
                  problem_type=Problem, problem=lambda point, cfg: Problem(point["pairs"], cfg.device),
                  measure=measure, ratios=[Ratio("÷ref", "reference")])
    main = SWEEP.main                 # python -m <module> [--pairs 8,64] [--reps 10] [--out x.csv] [--plot] ...

What the harness does with it (``Sweep.main``):
  flags      one comma-separated flag per axis, plus --providers --dtype --device --reps --warmup --threads --out
             --results --plot --plot-out (and --check, --inprocess, --mem-fraction, --worker-timeout where the sweep
             has a check, runs CPU points in fresh processes, or estimates memory), the benchmark's own ``options``
  sweep      the cartesian product of the axes (numbers ascending; the last axis is x, the innermost), each provider
             at each point; a provider that fails (or would not fit: ``estimate_bytes`` vs --mem-fraction of the
             free memory) is skipped at the larger x of the same other axes
  measure    ``measure(problem, provider, reps, warmup)`` → {"time": (median, q20, q80) s, "mem_extra": bytes or
             None, anything else}, in this process or (``fresh_process``, on CPU) in a fresh ``python -m <module>
             --worker`` process whose peak RSS is the provider's alone (see ``measure.py``)
  rows       a "time" row and a "memory_extra" row (MB) per measurement, stamped with machine, device, dtype, torch,
             commit and time (``records.py``), the point and the run's settings in the config JSON, appended to the
             CSV as they land (an interrupted sweep keeps what it measured)
  table      printed at the end: the axes, provider, time [q20, q80], the declared ratios, extra MB, extra columns
  plot       --plot: one PNG of this run's rows (``plots.plot_lines``), a panel column per value of ``panel``

Scripts that are not a sweep (bench/'s end-to-end benchmarks, experiments/) use the pieces: ``Recorder`` for rows,
``add_output_args`` / ``output_path`` for --out / --results, ``rows_table`` for the printed table, ``plot_bars``,
``run_worker`` / ``worker_main`` for fresh processes, and the timing and memory helpers of ``measure.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hermesflow_fast.benchmarks.measure import (  # noqa: F401  (the harness's public names, in one place)
    DTYPES,
    MB,
    PeakMemory,
    available_bytes,
    can_reset_cpu_peak,
    do_bench,
    profile_table,
    quantile,
    set_threads,
    stage_timer,
    sync,
    time_and_memory,
)
from hermesflow_fast.benchmarks.plots import plot_bars, plot_lines  # noqa: F401
from hermesflow_fast.benchmarks.records import (  # noqa: F401
    CSV_COLUMNS,
    IMPORT_ROOT,
    Recorder,
    append_rows,
    device_name,
    git_commit,
    make_row,
    output_dirs,
    read_rows,
    run_stamps,
)

TIME_UNITS = {"s": (1.0, 4), "ms": (1e3, 2), "µs": (1e6, 1)}  # scale, decimals
RESULT_TAG = "@@RESULT "

# ---------------------------------------------------------------------------------------------------------------------
# command-line pieces
# ---------------------------------------------------------------------------------------------------------------------


def names(s: str) -> list[str]:
    """A comma-separated list of names."""
    return [v.strip() for v in s.split(",") if v.strip()]


def add_output_args(ap: argparse.ArgumentParser, name: str, default: Path | None = None) -> None:
    """--out FILE ('' for none) and --results DIR; see ``output_path``."""
    where = f"{default}/results" if default else "bench/results in a checkout, else ./bench-results"
    ap.add_argument("--out", default=None, help=f"CSV to append to ('' for none; default {where}/{name}.csv)")
    ap.add_argument("--results", default=None, help="folder of the default CSV (and plots)")


def output_path(args: argparse.Namespace, name: str, default: Path | None = None) -> Path | None:
    """The CSV a run appends to: --out ('' → None), else <--results or the default folder>/<name>.csv."""
    if args.out is not None:
        return Path(args.out) if args.out else None
    return output_dirs(args.results, default)[0] / f"{name}.csv"


def plot_path(args: argparse.Namespace, name: str, default: Path | None = None) -> Path:
    """<--results or the default plot folder>/<name>.png."""
    return output_dirs(getattr(args, "results", None), default)[1] / f"{name}.png"


def add_run_args(ap: argparse.ArgumentParser, reps: int | None = 3, warmup: int | None = 1,
                 devices: Sequence[str] | None = ("cpu", "cuda")) -> None:
    """--device, --reps, --warmup (each unless its default is None) and --threads."""
    if devices:
        ap.add_argument("--device", choices=tuple(devices), default=devices[0])
    if reps is not None:
        ap.add_argument("--reps", type=int, default=reps, help=f"timed calls (default {reps})")
    if warmup is not None:
        ap.add_argument("--warmup", type=int, default=warmup, help=f"untimed calls first (default {warmup})")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def require_device(ap: argparse.ArgumentParser, device: str) -> None:
    """``ap.error`` unless ``device`` names a device torch has here."""
    try:
        cuda = is_cuda(device)
    except (RuntimeError, ValueError):
        ap.error(f"--device {device}: not a torch device (cpu, cuda, cuda:N)")
    if cuda and not torch.cuda.is_available():
        ap.error(f"--device {device} but torch.cuda.is_available() is False")


# ---------------------------------------------------------------------------------------------------------------------
# fresh-process workers (CPU memory is measured as the peak RSS of a process that did nothing else)
# ---------------------------------------------------------------------------------------------------------------------


def worker_env(threads: int | None = None, track_rss: bool = True, module: str | None = None) -> dict[str, str]:
    """Environment of a fresh measurement process: this package and ``module``'s top package importable.
    ``track_rss``: big buffers mmap'd, so RSS follows live memory (every large allocation then costs fresh page
    faults: time such a process only where that is what is measured)."""
    env = dict(os.environ)
    if track_rss:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    paths = [str(IMPORT_ROOT)]
    spec = importlib.util.find_spec(module.split(".")[0]) if module else None
    if spec is not None and spec.submodule_search_locations:
        paths += [str(Path(p).resolve().parent) for p in spec.submodule_search_locations]
    paths += [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_worker(module: str, spec: dict, threads: int | None, timeout: float | None, what: str,
               track_rss: bool = True) -> dict:
    """Run ``python -m <module> --worker <spec json>`` and return the dict its worker printed after RESULT_TAG."""
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, cwd=IMPORT_ROOT, env=worker_env(threads, track_rss, module), capture_output=True,
                          text=True, timeout=timeout)
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


# ---------------------------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------------------------


def align(header: Sequence[str], body: Sequence[Sequence[str] | None], left: Sequence[int] = ()) -> list[str]:
    """Text table lines: columns padded to their widest cell (right-aligned but for the ``left`` indices), a rule
    under the header; a None in ``body`` is a blank line."""
    widths = [max(len(str(r[i])) for r in [header, *(b for b in body if b)]) for i in range(len(header))]

    def line(cells):
        return " ".join(str(c).ljust(w) if i in left else str(c).rjust(w)
                        for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    head = line(header)
    return [head, "-" * len(head)] + [line(b) if b else "" for b in body]


def _num(v: float) -> str:
    return f"{v:.4g}"


def rows_table(rows: Sequence[dict], baseline: str | None = None, keys: Sequence[str] = ()) -> str:
    """CSV rows as a printed table: one line per (kernel, provider, x), a column per metric (median [q20, q80]) and
    its ratio to ``baseline``'s (default: the first provider of the kernel), then the config ``keys``."""
    metrics = list(dict.fromkeys((r["metric_name"], r["metric_unit"]) for r in rows))
    lines: dict[tuple, dict] = {}
    for r in rows:
        lines.setdefault((r["kernel_name"], r["kernel_provider"], r["x_name"], str(r["x_value"])), {})[
            r["metric_name"]] = r
    base: dict[tuple[str, str], float] = {}
    for (kernel, provider, _, _), by in lines.items():
        for m, r in by.items():
            if (kernel, m) not in base and (baseline is None or provider == baseline):
                base[(kernel, m)] = float(r["y_value_50"])
    header = ["kernel", "provider", "x"]
    for m, unit in metrics:
        header += [f"{m} ({unit})", f"÷{baseline or 'first'}"]
    header += list(keys)
    body = []
    for (kernel, provider, x_name, x), by in lines.items():
        cells = [kernel, provider, f"{x_name}={x}"]
        for m, _ in metrics:
            r = by.get(m)
            if r is None:
                cells += ["", ""]
                continue
            y = [float(r[k]) for k in ("y_value_50", "y_value_20", "y_value_80")]
            cells.append(_num(y[0]) if y[1] == y[2] == y[0] else f"{_num(y[0])} [{_num(y[1])}, {_num(y[2])}]")
            b = base.get((kernel, m))
            cells.append(f"{y[0] / b:.2f}" if b else "")
        cfg = json.loads(next(iter(by.values()))["extra_benchmark_config_str"] or "{}")
        cells += [_num(cfg[k]) if isinstance(cfg.get(k), float) else str(cfg.get(k, "")) for k in keys]
        body.append(cells)
    return "\n".join(align(header, body, left=(0, 1, 2)))


# ---------------------------------------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Axis:
    """A swept parameter: ``--<name>`` (or ``flag``) takes a comma-separated list; the point dict has ``name``;
    ``column`` is the rows' x_name when this axis is the sweep's x (the last axis)."""

    name: str
    default: tuple
    help: str = ""
    type: Callable[[str], Any] = int
    flag: str | None = None
    column: str | None = None

    def parse(self, s: str) -> list:
        return [self.type(v) for v in names(s)]


@dataclass(frozen=True)
class Ratio:
    """A table column: the row's time (or "memory") ÷ the ``baseline`` provider's at the same point."""

    title: str
    baseline: str
    metric: str = "time"
    fmt: str = ".2f"


@dataclass(frozen=True)
class Column:
    """A table column computed from a measurement (the dict ``measure`` returned, plus provider, point, problem)."""

    title: str
    value: Callable[[dict], str]


@dataclass
class Sweep:
    """A benchmark: see the module docstring. ``problem(point, cfg)`` builds the ``problem_type`` dataclass that
    ``measure`` (and a fresh-process worker, from its fields) takes."""

    name: str  # CSV stem (<results>/<name>.csv) and default plot stem
    module: str  # the module whose main runs it: the prog name, and what a fresh-process worker runs
    doc: str
    kernel: str | Callable[[dict], str]  # the rows' kernel_name, or a function of the point
    axes: Sequence[Axis]
    providers: Sequence[str]  # every provider, in the table's order
    problem_type: type
    problem: Callable[[dict, argparse.Namespace], Any]
    measure: Callable[[Any, str, int, int], dict]
    default_providers: Sequence[str] | None = None
    run_order: Sequence[str] | None = None  # the order providers run in at a point (default: as given)
    available: Callable[[str], tuple[bool, str]] | None = None  # (usable?, why not)
    check: Callable[[argparse.Namespace], str] | None = None  # correctness gate: raises, or returns a line to print
    always_check: bool = False  # without a --check flag
    fresh_process: bool = False  # CPU: each measurement in a fresh process (unless --inprocess)
    estimate_bytes: Callable[[str, Any], int] | None = None
    dtypes: Sequence[str] = ("fp32", "bf16", "fp16")
    reps: tuple[int, int] = (3, 10)  # default timed calls on (CPU, CUDA)
    warmup: tuple[int, int] = (1, 3)
    time_unit: str = "s"
    ratios: Sequence[Ratio] = ()
    columns: Sequence[Column] = ()
    config: Callable[[dict, argparse.Namespace], dict] | None = None  # row config beyond the point and settings
    options: Callable[[argparse.ArgumentParser], None] | None = None  # the benchmark's own flags
    presets: dict[str, tuple[str, dict]] = field(default_factory=dict)  # --<name>: (help, defaults it sets)
    validate: Callable[[argparse.Namespace], str | None] | None = None  # an error message, or None
    before_point: Callable[[Any], None] | None = None
    after_point: Callable[[list[dict]], None] | None = None
    title: Callable[[argparse.Namespace], str] | None = None
    panel: str | None = None  # --plot: one column of panels per value of this config key
    home: Path | None = None  # a checkout's bench folder: default results there, whatever the current directory

    # ------------------------------------------------------------------------------------------------- flags ---
    def parser(self) -> argparse.ArgumentParser:
        ap = argparse.ArgumentParser(prog=f"python -m {self.module}", description=self.doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        for a in self.axes:
            ap.add_argument(a.flag or f"--{a.name}", dest=a.name, type=a.parse, default=None,
                            help=f"{a.help}, comma separated (default {','.join(map(str, a.default))})")
        default = ",".join(self.default_providers or self.providers)
        ap.add_argument("--providers", type=names, default=None,
                        help=f"comma separated, from {','.join(self.providers)} (default {default})")
        for name, (text, _) in self.presets.items():
            ap.add_argument(f"--{name}", action="store_true", help=text)
        if self.options:
            self.options(ap)
        ap.add_argument("--dtype", choices=tuple(self.dtypes), default=self.dtypes[0])
        ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
        ap.add_argument("--reps", type=int, default=None,
                        help=f"timed calls per point (default {self.reps[0]} on CPU, {self.reps[1]} on CUDA)")
        ap.add_argument("--warmup", type=int, default=None,
                        help=f"untimed calls first (default {self.warmup[0]} on CPU, {self.warmup[1]} on CUDA)")
        ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
        if self.check and not self.always_check:
            ap.add_argument("--check", action="store_true", help="first assert the providers agree at a tiny shape")
        if self.fresh_process:
            ap.add_argument("--inprocess", action="store_true",
                            help="measure in this process (CPU memory numbers are then approximate)")
            ap.add_argument("--worker-timeout", type=float, default=None, help="seconds per CPU measurement process")
        if self.estimate_bytes:
            ap.add_argument("--mem-fraction", type=float, default=0.8,
                            help="skip a point whose estimated need exceeds this fraction of available memory")
        add_output_args(ap, self.name, self.home)
        ap.add_argument("--plot", action="store_true", help="write a PNG of this run's rows")
        ap.add_argument("--plot-out", default=None, help="where --plot writes (implies --plot)")
        ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
        return ap

    def parse_args(self, argv: list[str] | None = None) -> argparse.Namespace:
        ap = self.parser()
        cfg = ap.parse_args(argv)
        if cfg.worker is not None:
            return cfg
        require_device(ap, cfg.device)
        preset = {k: v for name, (_, values) in self.presets.items() if getattr(cfg, name) for k, v in values.items()}
        for a in self.axes:
            if getattr(cfg, a.name) is None:
                setattr(cfg, a.name, list(preset.get(a.name, a.default)))
        cuda = int(is_cuda(cfg.device))
        cfg.reps = cfg.reps or preset.get("reps", self.reps[cuda])
        cfg.warmup = cfg.warmup if cfg.warmup is not None else self.warmup[cuda]
        cfg.threads = cfg.threads or None
        wanted = cfg.providers or list(preset.get("providers", self.default_providers or self.providers))
        unknown = [n for n in wanted if n not in self.providers]
        if unknown:
            ap.error(f"unknown providers {unknown}; choose from {','.join(self.providers)}")
        cfg.providers = []
        for n in wanted:
            ok, why = self.available(n) if self.available else (True, "")
            if ok:
                cfg.providers.append(n)
            else:
                print(f"note: skipping provider {n}: {why}")
        cfg.check = self.check is not None and (self.always_check or cfg.check)
        cfg.inprocess = getattr(cfg, "inprocess", True)
        cfg.out = output_path(cfg, self.name, self.home)
        cfg.plot = cfg.plot or cfg.plot_out is not None
        cfg.plot_out = Path(cfg.plot_out) if cfg.plot_out else plot_path(cfg, self.name, self.home)
        message = self.validate(cfg) if self.validate else None
        if message:
            ap.error(message)
        return cfg

    # ------------------------------------------------------------------------------------------------- sweep ---
    def points(self, cfg: argparse.Namespace) -> list[dict]:
        """Every combination of the axes' values (numbers ascending), the last axis innermost."""
        values = []
        for a in self.axes:
            v = getattr(cfg, a.name)
            values.append(sorted(v) if all(isinstance(x, int | float) for x in v) else list(v))
        return [dict(zip((a.name for a in self.axes), combo, strict=True)) for combo in itertools.product(*values)]

    def measure_in_subprocess(self, p: Any, provider: str, reps: int, warmup: int, threads: int | None,
                              timeout: float | None) -> dict:
        """``measure`` in a fresh ``python -m <module> --worker`` process (CPU memory needs a fresh RSS)."""
        spec = {"problem": dataclasses.asdict(p), "provider": provider, "reps": reps, "warmup": warmup,
                "threads": threads}
        return run_worker(self.module, spec, threads, timeout, f"{provider} at {p}")

    def run(self, cfg: argparse.Namespace, on_result: Callable[[dict], object] | None = None) -> list[dict]:
        """Every (point, provider); ``on_result`` sees each measurement as it lands. A provider that fails or is
        skipped at a point is skipped at the larger x of the same other axes."""
        subprocs = self.fresh_process and not is_cuda(cfg.device) and not cfg.inprocess
        x = self.axes[-1].name
        results, dropped = [], set()
        for point in self.points(cfg):
            p = self.problem(point, cfg)
            if self.before_point:
                self.before_point(p)
            where = " ".join(f"{k}={v}" for k, v in point.items())
            rest = tuple((k, v) for k, v in point.items() if k != x)
            order = sorted(cfg.providers, key=self.run_order.index) if self.run_order else cfg.providers
            here = []
            for name in order:
                if (name, rest) in dropped:
                    print(f"  skip {name} at {where}: it failed or was skipped at a smaller {x}", flush=True)
                    continue
                if self.estimate_bytes:
                    need, avail = self.estimate_bytes(name, p), available_bytes(cfg.device)
                    if need > cfg.mem_fraction * avail:
                        print(f"  skip {name} at {where}: needs ~{need / MB:,.0f} MB, {cfg.mem_fraction:.0%} of "
                              f"available is {cfg.mem_fraction * avail / MB:,.0f} MB", flush=True)
                        dropped.add((name, rest))
                        continue
                t0 = time.perf_counter()
                try:
                    if subprocs:
                        r = self.measure_in_subprocess(p, name, cfg.reps, cfg.warmup, cfg.threads,
                                                       cfg.worker_timeout)
                    else:
                        r = self.measure(p, name, cfg.reps, cfg.warmup)
                except (RuntimeError, subprocess.TimeoutExpired) as e:  # torch OOM errors are RuntimeErrors
                    print(f"  FAILED {name} at {where}: {e}", flush=True)
                    dropped.add((name, rest))
                    continue
                finally:  # in process: free this point's inputs and cached blocks before the next one
                    gc.collect()
                    if is_cuda(cfg.device):
                        torch.cuda.empty_cache()
                r = {**r, "provider": name, "point": point,
                     "problem": dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p}
                scale, dec = TIME_UNITS[self.time_unit]
                mem = "" if r.get("mem_extra") is None else f", extra {r['mem_extra'] / MB:,.1f} MB"
                print(f"  {where}  {name:<14} {r['time'][0] * scale:.{dec}f} {self.time_unit}{mem}  "
                      f"({time.perf_counter() - t0:.0f} s wall)", flush=True)
                results.append(r)
                here.append(r)
                if on_result is not None:
                    on_result(r)
            if self.after_point and here:
                self.after_point(here)
        return results

    # -------------------------------------------------------------------------------------------- rows, table ---
    def row_args(self, r: dict, cfg: argparse.Namespace) -> list[dict]:
        """``make_row`` keywords of one measurement: its time row and, when measured, its memory row."""
        x = self.axes[-1]
        config = {**r["point"], "dtype": cfg.dtype, "device": cfg.device,
                  "threads": cfg.threads or torch.get_num_threads(), "reps": cfg.reps, "warmup": cfg.warmup}
        if r.get("mem_extra") is not None:
            config["peak_reset"] = r.get("peak_reset")
        if self.config:
            config.update(self.config(r, cfg))
        kernel = self.kernel(r["point"]) if callable(self.kernel) else self.kernel
        common = dict(kernel_name=kernel, provider=r["provider"], x_name=x.column or x.name,
                      x_value=r["point"][x.name], config=config, dtype=cfg.dtype)
        out = [dict(metric="time", unit="s", y=r["time"], **common)]
        if r.get("mem_extra") is not None:
            out.append(dict(metric="memory_extra", unit="MB", y=[r["mem_extra"] / MB] * 3, **common))
        return out

    def format_table(self, results: list[dict], cfg: argparse.Namespace) -> str:
        unit, (scale, dec) = self.time_unit, TIME_UNITS[self.time_unit]
        head = self.title(cfg) if self.title else self.name
        head += (f"\n{cfg.dtype} on {device_name(cfg.device)} ({cfg.device}, {torch.get_num_threads()} threads), "
                 f"median of {cfg.reps} reps")
        memory = any(r.get("mem_extra") is not None for r in results)
        header = [a.name for a in self.axes] + ["provider", f"time {unit}", "[q20, q80]"]
        header += [q.title for q in self.ratios] + (["extra MB"] if memory else []) + [c.title for c in self.columns]
        groups: dict[tuple, dict[str, dict]] = {}
        for r in results:
            groups.setdefault(tuple(r["point"].values()), {})[r["provider"]] = r
        body: list[list[str] | None] = []
        for values, by in groups.items():
            for name in (n for n in self.providers if n in by):
                r = by[name]
                t = [v * scale for v in r["time"]]
                cells = [*map(str, values), name, f"{t[0]:.{dec}f}", f"[{t[1]:.{dec}f}, {t[2]:.{dec}f}]"]
                for q in self.ratios:
                    mine, base = _value(r, q.metric), _value(by.get(q.baseline), q.metric)
                    cells.append(format(mine / base, q.fmt) if mine is not None and base else "")
                if memory:
                    cells.append("n/a" if r.get("mem_extra") is None else f"{r['mem_extra'] / MB:,.1f}")
                cells += [c.value(r) for c in self.columns]
                body.append(cells)
            body.append(None)
        return head + "\n" + "\n".join(align(header, body, left=(len(self.axes),)))

    # ------------------------------------------------------------------------------------------------- main ---
    def main(self, argv: list[str] | None = None, cfg: argparse.Namespace | None = None) -> list[dict]:
        """Run the sweep the arguments describe: rows appended to the CSV, a table printed, a plot with --plot;
        returns the measurements (dicts)."""
        cfg = cfg or self.parse_args(argv)
        if cfg.worker is not None:
            worker_main(cfg.worker, self.measure, self.problem_type)
            return []
        set_threads(cfg.threads)
        if cfg.check:
            print(self.check(cfg), flush=True)
        subprocs = self.fresh_process and not is_cuda(cfg.device) and not cfg.inprocess
        axes = ", ".join(f"{a.name} {getattr(cfg, a.name)}" for a in self.axes)
        where = "one fresh process per point" if subprocs else "in process"
        print(f"sweep: {axes}, providers {cfg.providers}, {where}", flush=True)
        rec, results = Recorder(cfg.out, cfg.device), []

        def keep(r: dict) -> None:  # row by row, so an interrupted sweep keeps what it measured
            results.append(r)
            for kw in self.row_args(r, cfg):
                rec.add(**kw)
            rec.flush()

        try:
            self.run(cfg, keep)
        except KeyboardInterrupt:
            print("\ninterrupted: the table below has the points measured so far")
        print()
        print(self.format_table(results, cfg))
        rows = rec.done()
        if cfg.plot and rows:
            print(f"wrote {plot_lines(rows, cfg.plot_out, panel=self.panel)}")
        return results


def _value(r: dict | None, metric: str) -> float | None:
    if r is None:
        return None
    return r["time"][0] if metric == "time" else r.get("mem_extra")
