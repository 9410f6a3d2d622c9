"""PNG plots of a results CSV: one figure per metric, y vs x (log-x), one line per provider, q20–q80 shaded
(``hermesflow_fast.benchmarks.plots``; the latest run's commit and device unless --all / --commit / --device).

    python -m bench.plot bench/results/logprobs.csv        # -> bench/plots/logprobs_time.png, logprobs_memory.png
    python -m bench.plot /tmp/x.csv --outdir /tmp/plots --all
"""

from __future__ import annotations

from pathlib import Path

from hermesflow_fast.benchmarks import plots


def main(argv: list[str] | None = None) -> list[Path]:
    return plots.main(argv, prog="python -m bench.plot")


if __name__ == "__main__":
    main()
