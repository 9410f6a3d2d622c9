"""The op microbenchmarks and the harness every benchmark of the project runs on; they ship with the package.

    hermesflow bench logprobs [FLAGS]    fused LM head + log-probs + DPO, fwd+bwd (logprobs.py)
    hermesflow bench dpo [FLAGS]         the DPO / Pair-DPO loss on sequence log-probs alone (dpo.py)
    hermesflow bench nearest [FLAGS]     nearest-code search (nearest.py)
    python -m hermesflow_fast.benchmarks.<logprobs|dpo|nearest> --help
    python -m hermesflow_fast.benchmarks.plots <csv>      # PNGs of a results CSV

Modules: ``harness`` (the sweep a benchmark declares, workers, tables; re-exports the rest), ``measure`` (timing
quantiles, peak memory), ``records`` (stamps, CSV rows, where results go), ``plots``. The end-to-end benchmarks
(training step, curation, generation, block masks) need the source checkout and live in its ``bench/``.
"""
