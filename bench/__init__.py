"""Benchmarks beside the code: one script per op, shared helpers in ``bench.utils``, append-only CSVs, PNG plots.

    python -m bench.bench_logprobs --help      # fused LM head + log-probs + DPO loss, fwd+bwd (the hot path)
    python -m bench.bench_dpo                  # the DPO / Pair-DPO loss on sequence log-probs alone
    python -m bench.plot bench/results/logprobs.csv
    bash bench/gpu/run.sh                      # on a CUDA machine: GPU tests + the sweeps, everything under $OUT
"""
