"""The `hermesflow` console script: env report and the bench wrapper."""

import csv
import subprocess
import sys

from click.testing import CliRunner

from hermesflow_fast.cli import main


def test_env_reports_what_a_bug_report_needs():
    result = CliRunner().invoke(main, ["env"])
    assert result.exit_code == 0, result.output
    for key in ("torch", "CUDA available", "triton", "extension hermesflow_fast._C", "liger-kernel", "flash-attn"):
        assert key in result.output


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "hermesflow_fast.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "bench" in out.stdout and "env" in out.stdout


def test_bench_logprobs_wrapper_writes_rows(tmp_path):
    out = tmp_path / "x.csv"
    args = ["--H", "32", "--V", "200", "--tokens", "64", "--providers", "naive,ours", "--reps", "1",
            "--inprocess", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-m", "hermesflow_fast.cli", "bench", "logprobs", *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert {r["kernel_provider"] for r in rows} == {"naive", "ours"}
