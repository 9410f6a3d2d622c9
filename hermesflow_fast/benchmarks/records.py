"""The rows of the benchmark harness: stamps (machine, device, torch, commit, time), the CSV format, where CSVs go.

Every benchmark appends to one CSV per benchmark with Liger's columns plus ours (``CSV_COLUMNS``); a row is one metric
of one provider at one x, its shapes and settings as JSON in ``extra_benchmark_config_str``.

    rec = Recorder("bench/results/x.csv", device="cpu", kernel_name="x", x_name="pairs", unit="s")
    rec.add(provider="ours", metric="time", x_value=8, y=(0.1, 0.09, 0.12), config={"pairs": 8})
    rec.done()                                   # appends the rows, prints "appended 1 rows to bench/results/x.csv"

Commit: ``git rev-parse --short HEAD`` of the source checkout the package is imported from (``-dirty`` when tracked
files differ, results and plots aside); outside a checkout (an installed package) ``hermesflow_fast-<version>``;
``HFF_COMMIT`` overrides both (a copy of the tree without its ``.git``, e.g. on a remote GPU machine).

Where CSVs go when no ``--out`` names one (``output_dirs``): ``--results DIR``; else ``bench/results/`` (plots in
``bench/plots/``) when the current directory holds ``bench/results`` (a checkout); else ``./bench-results/``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import re
import socket
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

import hermesflow_fast

IMPORT_ROOT = Path(hermesflow_fast.__file__).resolve().parents[1]  # the folder that holds the hermesflow_fast package

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

__all__ = [
    "CSV_COLUMNS", "IMPORT_ROOT", "Recorder", "append_rows", "checkout_root", "cpu_model", "device_name",
    "git_commit", "machine_info", "make_row", "output_dirs", "read_rows", "run_stamps", "timestamp",
]

# ---------------------------------------------------------------------------------------------------------------------
# stamps
# ---------------------------------------------------------------------------------------------------------------------


def checkout_root() -> Path | None:
    """The source checkout the package is imported from (it has pyproject.toml and bench/), or None."""
    root = IMPORT_ROOT
    return root if (root / "pyproject.toml").is_file() and (root / "bench").is_dir() else None


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
    """Short SHA of the checkout's HEAD (``-dirty`` when tracked files differ from it, the appended results and plots
    aside; untracked files do not count); ``hermesflow_fast-<version>`` outside a checkout; ``HFF_COMMIT`` wins."""
    if os.environ.get("HFF_COMMIT"):
        return os.environ["HFF_COMMIT"]
    root = checkout_root()
    if root is None:
        return f"hermesflow_fast-{hermesflow_fast.__version__}"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results", ":!bench/plots"],
            cwd=root, capture_output=True, text=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_stamps(device: torch.device | str) -> dict:
    """The columns shared by every row of one run."""
    return {
        "machine": machine_info(),
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "commit": git_commit(),
        "timestamp": timestamp(),
    }


# ---------------------------------------------------------------------------------------------------------------------
# rows and CSVs
# ---------------------------------------------------------------------------------------------------------------------


def make_row(
    *,
    kernel_name: str,
    provider: str,
    metric: str,
    unit: str,
    x_name: str,
    x_value: float | str,
    y: Sequence[float],
    config: dict,
    device: torch.device | str,
    dtype: str,
    mode: str = "full",
    stamps: dict | None = None,
) -> dict:
    """One CSV row; ``y`` = (median, q20, q80), or (value,). ``stamps`` (machine/commit/...) are best taken once per
    run (``run_stamps``)."""
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


def output_dirs(results: str | os.PathLike | None = None, default: Path | None = None) -> tuple[Path, Path]:
    """(CSV folder, plot folder): ``results`` for both when given; else ``default``/results + ``default``/plots when
    a bench folder is given (the checkout's scripts); else ./bench/results + ./bench/plots when the current
    directory has bench/results; else ./bench-results for both."""
    if results:
        return Path(results), Path(results)
    if default is not None:
        return default / "results", default / "plots"
    if Path("bench/results").is_dir():
        return Path("bench/results"), Path("bench/plots")
    return Path("bench-results"), Path("bench-results")


class Recorder:
    """The rows of one run: stamps taken once, defaults for the columns every row shares, rows appended to ``path``
    (none when ``path`` is empty or None) by ``flush`` (as they come) or ``done`` (at the end, with a line saying
    where). ``echo``: print each row as one line when it is added (progress of a long run)."""

    def __init__(self, path: str | os.PathLike | None, device: torch.device | str = "cpu", echo: bool = False,
                 **defaults):
        self.path = Path(path) if path else None
        self.echo = echo
        self.device = str(device)
        self.stamps = run_stamps(device)
        self.defaults = {"dtype": "fp32", **defaults}
        self.rows: list[dict] = []
        self.written = 0

    def add(self, **columns) -> dict:
        """One row: ``make_row``'s keywords, those given at construction as defaults."""
        row = make_row(**{**self.defaults, **columns}, device=self.device, stamps=self.stamps)
        self.rows.append(row)
        if self.echo:
            print(f"  {row['kernel_name']} {row['kernel_provider']:<18} {row['x_name']}={row['x_value']}  "
                  f"{row['metric_name']} {float(row['y_value_50']):.4g} {row['metric_unit']}", flush=True)
        return row

    def flush(self) -> int:
        """Append the rows not yet written; returns how many were."""
        new = self.rows[self.written:]
        if self.path is not None and new:
            append_rows(self.path, new)
        self.written = len(self.rows)
        return len(new)

    def done(self) -> list[dict]:
        """Flush and say where the rows went; returns every row of the run."""
        self.flush()
        if self.path is not None:
            print(f"appended {len(self.rows)} rows to {self.path}", flush=True)
        return self.rows
