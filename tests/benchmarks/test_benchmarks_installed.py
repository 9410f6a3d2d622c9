"""`hermesflow bench dpo` from a non-editable install: the package copied alone into a folder (as a wheel lays it
out: hermesflow_fast/ with its kernels/ inside), nothing of the checkout importable, run from another folder. The row
lands in ./bench-results/dpo.csv, stamped with the package's version for a commit; the end-to-end benches say they
need the checkout."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import hermesflow_fast

PACKAGE = Path(hermesflow_fast.__file__).resolve().parent
KERNELS = PACKAGE.parent / "kernels"


def test_bench_dpo_runs_from_an_installed_copy(tmp_path):
    site, work = tmp_path / "site", tmp_path / "work"
    work.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(PACKAGE, site / "hermesflow_fast", ignore=ignore)
    if KERNELS.is_dir() and not (site / "hermesflow_fast" / "kernels").exists():
        shutil.copytree(KERNELS, site / "hermesflow_fast" / "kernels", ignore=ignore)
    env = {k: v for k, v in os.environ.items() if k not in ("HFF_COMMIT",)}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    where = [sys.executable, "-c", "import hermesflow_fast.benchmarks.dpo as m; print(m.__file__)"]
    assert subprocess.run(where, cwd=work, env=env, capture_output=True, text=True).stdout.startswith(str(site))

    cmd = [sys.executable, "-m", "hermesflow_fast.cli", "bench", "dpo", "--kernels", "dpo_loss", "--pairs", "8",
           "--reps", "2", "--warmup", "1", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = work / "bench-results" / "dpo.csv"
    assert f"appended 2 rows to {Path('bench-results') / 'dpo.csv'}" in proc.stdout
    rows = list(csv.DictReader(out.open()))
    assert [(r["kernel_name"], r["kernel_provider"], r["x_value"]) for r in rows] == [
        ("dpo_loss", "reference", "8"), ("dpo_loss", "ours", "8")]
    assert all(r["commit"] == f"hermesflow_fast-{hermesflow_fast.__version__}" for r in rows)
    assert json.loads(rows[0]["extra_benchmark_config_str"])["threads"] == 1 and float(rows[1]["y_value_50"]) > 0

    proc = subprocess.run([sys.executable, "-m", "hermesflow_fast.cli", "bench", "step"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "source checkout" in proc.stderr and "pip install -e ." in proc.stderr
