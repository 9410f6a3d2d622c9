"""End-to-end benchmarks of the source checkout, on the harness of ``hermesflow_fast.benchmarks``; results/*.csv
(append-only, one per benchmark), plots/*.png, gpu/run.sh.

    python -m bench.bench_step --help          # one Pair-DPO training step: ours vs a HermesFlow-style step
    python -m bench.bench_curation             # one curation pass: ours vs a HermesFlow-style pass
    python -m bench.bench_generate all         # caption decoding (KV cache) and MaskGIT sampling
    python -m bench.bench_block_mask           # FlexAttention BlockMask construction
    python -m bench.demo_rows runs/demo        # a finished demo run as rows of results/demo.csv
    python -m bench.plot bench/results/logprobs.csv        # PNGs of any results CSV
    python -m bench.table bench/results/logprobs.csv       # the README's table of the fused head's rows
    bash bench/gpu/run.sh                      # on a CUDA machine: GPU tests + the sweeps, everything under $OUT

The op microbenchmarks (logprobs, dpo, nearest) ship with the package: ``hermesflow bench logprobs|dpo|nearest``.
"""

from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent  # its results/ and plots/ are where these scripts write by default
