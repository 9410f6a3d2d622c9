"""Research scripts: questions about self-play on the shapes world, each answered by one run whose rows append to a
CSV under bench/results/ (see README.md). Run them from the checkout's root: ``python -m experiments.<name>``."""

from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"  # results go to bench/results/<name>.csv
