#!/usr/bin/env bash
# GPU check of hermesflow_fast on one CUDA machine (an H100; no internet; torch with CUDA preinstalled).
#
#     bash bench/gpu/run.sh                 # from the repo root; everything lands under $OUT (default ./gpu-out)
#     OUT=/tmp/gpu HFF_GPU_BUDGET_S=300 bash bench/gpu/run.sh
#
# Steps, each in its own log under $OUT and each allowed to fail without stopping the others; each writes its CSV
# (rows appended as they are measured) before the next starts, so a run cut off by the machine's limit still returns
# the numbers measured so far. In this order:
#   env        nvidia-smi, torch / CUDA / triton / liger versions
#   build      pip install --no-deps --no-build-isolation -e .   (builds hermesflow_fast._C; nothing downloaded)
#   bench_step bench_step --device cuda --dtype bf16 --preset show_o_512 --pairs 8 --compile: one Pair-DPO training
#              step, HermesFlow-style vs ours with every lever (+compile) and the ablation rows, pairs/s, peak
#              memory, MFU                                            -> $OUT/step_gpu.csv, $OUT/plots/step_gpu.png
#   bench_bf16 benchmarks.logprobs --device cuda --dtype bf16, 1k..16k tokens, peak memory   -> $OUT/logprobs_gpu.csv
#   bench_cur  bench_curation --preset show_o_512: one curation pass with the original's sampling settings (the
#              selfplay-real recipe; 16 steps here to fit), HermesFlow-style vs ours      -> $OUT/curation_gpu.csv
#   pytest     python -m pytest -q -m gpu tests
#   then, as the budget allows: bench_grid (the head over H × V × tokens), bench_bm (block masks), prof_step and
#   prof_cur (torch.profiler tables in their logs), bench_dpo, bench_gen, bench_nc, bench_fp32, plots.
# A wall-clock budget (HFF_GPU_BUDGET_S, default 530 s) caps every step's timeout, so the whole run stays under 9
# minutes (steps past the budget are skipped: pick them with HFF_GPU_STEPS in a second call); $OUT/summary.txt has
# one line per step: name, exit code, seconds. Exit code: 0 when every step passed.
# PYTHON=... picks the interpreter (default: python); HFF_GPU_SKIP_BUILD=1 skips the build (already installed);
# HFF_GPU_STEPS=pytest,bench_step runs only the named steps (env and build always run); HFF_COMMIT=<sha> stamps the
# CSV rows when the tree has no .git; HFF_GPU_TAR=<file> archives $OUT into one file at the end.

set -u
cd "$(dirname "$0")/../.."
OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
BUDGET="${HFF_GPU_BUDGET_S:-530}"
START=$SECONDS
FAILED=0
export PYTHONUNBUFFERED=1
: > "$OUT/summary.txt"

# step NAME TIMEOUT_S TAIL_LINES CMD...: run CMD with a timeout (capped by what is left of the budget), log it,
# print its last TAIL_LINES lines, record "NAME rc seconds".
step() {
    local name=$1 limit=$2 tail_lines=$3
    shift 3
    if [[ -n "${HFF_GPU_STEPS:-}" && $name != env && $name != build && ",$HFF_GPU_STEPS," != *",$name,"* ]]; then
        return 0
    fi
    local left=$((BUDGET - (SECONDS - START)))
    if ((left < 15)); then
        echo "== $name: skipped, budget of ${BUDGET}s spent" | tee -a "$OUT/summary.txt"
        FAILED=$((FAILED + 1))
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (timeout ${limit}s): $*"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n "$tail_lines" "$OUT/$name.log"
    printf '%-11s rc=%-3s %4ss\n' "$name" "$rc" "$((SECONDS - t0))" | tee -a "$OUT/summary.txt"
    ((rc != 0)) && FAILED=$((FAILED + 1))
    return 0
}

env_report() {
    nvidia-smi || echo "nvidia-smi failed (rc=$?)"
    "$PY" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.1f} GiB", f"{p.multi_processor_count} SMs")
for name in ("triton", "liger_kernel", "pytest", "matplotlib", "hermesflow_fast"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "(no __version__)"))
    except Exception as e:
        print(name, "not importable:", type(e).__name__, e)
EOF
}

build() {
    "$PY" -m pip install --no-deps --no-build-isolation -e . || {
        echo "full build failed; retrying without the CUDA kernels (HFF_SKIP_CUDA_BUILD=1)"
        HFF_SKIP_CUDA_BUILD=1 "$PY" -m pip install --no-deps --no-build-isolation -e .
    }
    "$PY" -c "import hermesflow_fast, importlib.util as u; print('hermesflow_fast._C:', u.find_spec('hermesflow_fast._C') is not None)"
}

plots() {
    local csv
    for csv in "$OUT/logprobs_gpu.csv" "$OUT/dpo_gpu.csv"; do
        if [[ -s "$csv" ]]; then "$PY" -m bench.plot "$csv" --outdir "$OUT/plots"; else echo "no $csv"; fi
    done
}

# timeout runs executables, not shell functions: run the functions in a child bash that has them
export -f env_report build plots
export PY OUT

step env 20 40 bash -c env_report
if [[ "${HFF_GPU_SKIP_BUILD:-0}" == 1 ]]; then
    echo "== build: skipped (HFF_GPU_SKIP_BUILD=1)" | tee -a "$OUT/summary.txt"
else
    step build 120 15 bash -c build
fi
# 1. the training step at Show-o-512's shape: HermesFlow-style vs ours with every lever (+compile: per-block
#    torch.compile on the varlen attention path), pairs/s, peak memory, MFU
step bench_step 180 25 "$PY" -m bench.bench_step --device cuda --dtype bf16 --preset show_o_512 --pairs 8 \
    --compile --reps 3 --out "$OUT/step_gpu.csv" --plot "$OUT/plots/step_gpu.png"
# 2. the fused head in bf16, 1k..16k tokens, with peak memory (ours vs liger, torch chunked, TRL, naive, GEMM floor)
step bench_bf16 90 60 "$PY" -m hermesflow_fast.benchmarks.logprobs --device cuda --dtype bf16 \
    --tokens 1024,2048,4096,8192,16384 --reps 5 --check --out "$OUT/logprobs_gpu.csv"
# 3. one curation pass at Show-o-512's shape with the original's sampling settings (the selfplay-real recipe)
step bench_cur 60 10 "$PY" -m bench.bench_curation --device cuda --dtype bf16 --preset show_o_512 --records 2 \
    --images 8 --steps 16 --out "$OUT/curation_gpu.csv"
# 4. the GPU test tier
step pytest 60 25 "$PY" -m pytest -q -m gpu tests
# the rest, as the budget allows (HFF_GPU_STEPS picks them in a second call)
step bench_grid 150 40 "$PY" -m hermesflow_fast.benchmarks.logprobs --grid --device cuda --dtype bf16 --reps 5 \
    --out "$OUT/logprobs_gpu.csv"
step bench_bm 60 12 "$PY" -m bench.bench_block_mask --device cuda --tokens 4096,8192,16384 --reps 10 \
    --out "$OUT/block_mask_gpu.csv"
step prof_step 120 90 "$PY" -m bench.bench_step --device cuda --dtype bf16 --preset show_o_512 --pairs 8 \
    --no-compile --profile hermesflow,+packing,+fused_head --out ''
step prof_cur 90 60 "$PY" -m bench.bench_curation --device cuda --dtype bf16 --preset show_o_512 --records 1 \
    --images 8 --steps 16 --profile ours --out ''
step bench_dpo 30 30 "$PY" -m hermesflow_fast.benchmarks.dpo --device cuda --reps 50 --out "$OUT/dpo_gpu.csv"
step bench_gen 100 20 "$PY" -m bench.bench_generate all --device cuda --d 2048 --layers 24 --heads 32 --batch 16 \
    --grid 16 --codes 8192 --text-len 129 --steps 16 --prompts 2 --images 2 --reps 2 \
    --out "$OUT/generate_gpu.csv" --plot "$OUT/plots/generate_gpu.png"
step bench_nc 40 45 "$PY" -m hermesflow_fast.benchmarks.nearest --device cuda --reps 20 --check \
    --out "$OUT/nearest_code_gpu.csv"
step bench_fp32 80 30 "$PY" -m hermesflow_fast.benchmarks.logprobs --device cuda --dtype fp32 --tokens 2048,8192 \
    --reps 5 --out "$OUT/logprobs_gpu.csv"
step plots 30 10 bash -c plots

echo "== summary ($((SECONDS - START))s of ${BUDGET}s budget; logs and CSVs in $OUT)"
cat "$OUT/summary.txt"
# HFF_GPU_TAR=/path/gpu.tgz: everything under $OUT in one archive (for runners that fetch only a few files back)
if [[ -n "${HFF_GPU_TAR:-}" ]]; then tar czf "$HFF_GPU_TAR" -C "$OUT" . && echo "archive: $HFF_GPU_TAR"; fi
exit $((FAILED > 0))
