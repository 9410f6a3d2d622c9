#!/usr/bin/env bash
# GPU check of hermesflow_fast on one CUDA machine (an H100; no internet; torch with CUDA preinstalled).
#
#     bash bench/gpu/run.sh                 # from the repo root; everything lands under $OUT (default ./gpu-out)
#     OUT=/tmp/gpu HFF_GPU_BUDGET_S=300 bash bench/gpu/run.sh
#
# Steps, each in its own log under $OUT and each allowed to fail without stopping the others:
#   env        nvidia-smi, torch / CUDA / triton / liger versions
#   build      pip install --no-deps --no-build-isolation -e .   (builds hermesflow_fast._C; nothing downloaded)
#   pytest     python -m pytest -q -m gpu tests
#   bench_bf16 benchmarks.logprobs --device cuda --dtype bf16, 1k..16k tokens, 10 reps -> $OUT/logprobs_gpu.csv
#   bench_fp32 the same in fp32 at 2k and 8k tokens                                 -> $OUT/logprobs_gpu.csv
#   bench_grid benchmarks.logprobs --grid --device cuda --dtype bf16: the chunk budget's heads, H 1024..4096 × V 32k..152k
#              × 2k..8k tokens, gemm_floor / ours (chunked) / naive, 5 reps         -> $OUT/logprobs_gpu.csv
#   bench_dpo  benchmarks.dpo --device cuda                                          -> $OUT/dpo_gpu.csv
#   bench_nc   benchmarks.nearest --device cuda, N=16384, K 512..16384, D 8/13/256   -> $OUT/nearest_code_gpu.csv
#   bench_gen  bench_generate all --device cuda at Show-o-512's backbone (random weights): caption decoding
#              (original / recompute / KV cache) and MaskGIT at 16×16 tokens, 8,192 codes  -> $OUT/generate_gpu.csv
#   bench_step bench_step --device cuda --dtype bf16 --preset show_o_512 --pairs 8: one Pair-DPO training step,
#              HermesFlow-style vs ours and the ablation rows, pairs/s, peak memory, MFU (no +compile row: its
#              Inductor compile would not fit the step's 90 s)           -> $OUT/step_gpu.csv, $OUT/plots/step_gpu.png
#   bench_cur  bench_curation --device cuda --dtype bf16 --preset show_o_512: one curation pass (10 captions, 8
#              images, self-VQA per record), HermesFlow-style vs ours, at Show-o-512's shape (random weights, 1,024
#              image tokens)                                                     -> $OUT/curation_gpu.csv
#   bench_bm   bench_block_mask --device cuda: BlockMask construction, ours vs create_block_mask -> $OUT/block_mask_gpu.csv
#   prof_step  bench_step --profile: one step each of hermesflow, +packing, +fused_head under torch.profiler, top
#              ops by self CUDA time (in its log)
#   prof_cur   bench_curation --profile ours: one curation pass of one record under torch.profiler (in its log)
#   plots      bench.plot of both CSVs (when matplotlib is there)                    -> $OUT/plots/
# Steps run in the order of the list below: what is still unmeasured first (the training step and curation since
# the fixes of 1b7fccd), then the GPU test tier, the block-mask bench, the profiles, and the rest. A wall-clock budget (HFF_GPU_BUDGET_S,
# default 480 s) caps every step's timeout, so the whole run stays under 8 minutes (steps past the budget are
# skipped: pick them with HFF_GPU_STEPS in a second call); $OUT/summary.txt has one line
# per step: name, exit code, seconds. Exit code: 0 when every step passed.
# PYTHON=... picks the interpreter (default: python); HFF_GPU_SKIP_BUILD=1 skips the build (already installed);
# HFF_GPU_STEPS=pytest,bench_step runs only the named steps (env and build always run); HFF_COMMIT=<sha> stamps the
# CSV rows when the tree has no .git; HFF_GPU_TAR=<file> archives $OUT into one file at the end.

set -u
cd "$(dirname "$0")/../.."
OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
BUDGET="${HFF_GPU_BUDGET_S:-480}"
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

step env 60 40 bash -c env_report
if [[ "${HFF_GPU_SKIP_BUILD:-0}" == 1 ]]; then
    echo "== build: skipped (HFF_GPU_SKIP_BUILD=1)" | tee -a "$OUT/summary.txt"
else
    step build 150 15 bash -c build
fi
step bench_step 200 25 "$PY" -m bench.bench_step --device cuda --dtype bf16 --preset show_o_512 --pairs 8 \
    --no-compile --reps 3 --out "$OUT/step_gpu.csv" --plot "$OUT/plots/step_gpu.png"
step bench_cur 150 10 "$PY" -m bench.bench_curation --device cuda --dtype bf16 --preset show_o_512 --records 4 \
    --images 8 --out "$OUT/curation_gpu.csv"
step bench_grid 150 40 "$PY" -m hermesflow_fast.benchmarks.logprobs --grid --device cuda --dtype bf16 --reps 5 \
    --out "$OUT/logprobs_gpu.csv"
step pytest 150 25 "$PY" -m pytest -q -m gpu tests
step bench_bm 60 12 "$PY" -m bench.bench_block_mask --device cuda --tokens 4096,8192,16384 --reps 10 \
    --out "$OUT/block_mask_gpu.csv"
step prof_step 120 90 "$PY" -m bench.bench_step --device cuda --dtype bf16 --preset show_o_512 --pairs 8 \
    --no-compile --profile hermesflow,+packing,+fused_head --out ''
step bench_bf16 170 60 "$PY" -m hermesflow_fast.benchmarks.logprobs --device cuda --dtype bf16 --tokens 1024,2048,4096,8192,16384 \
    --reps 10 --check --out "$OUT/logprobs_gpu.csv"
step prof_cur 90 60 "$PY" -m bench.bench_curation --device cuda --dtype bf16 --preset show_o_512 --records 1 \
    --images 8 --profile ours --out ''
step bench_dpo 30 30 "$PY" -m hermesflow_fast.benchmarks.dpo --device cuda --reps 50 --out "$OUT/dpo_gpu.csv"
step bench_gen 100 20 "$PY" -m bench.bench_generate all --device cuda --d 2048 --layers 24 --heads 32 --batch 16 \
    --grid 16 --codes 8192 --text-len 129 --steps 16 --prompts 2 --images 2 --reps 2 \
    --out "$OUT/generate_gpu.csv" --plot "$OUT/plots/generate_gpu.png"
step bench_nc 40 45 "$PY" -m hermesflow_fast.benchmarks.nearest --device cuda --reps 20 --check --out "$OUT/nearest_code_gpu.csv"
step bench_fp32 80 30 "$PY" -m hermesflow_fast.benchmarks.logprobs --device cuda --dtype fp32 --tokens 2048,8192 --reps 5 \
    --out "$OUT/logprobs_gpu.csv"
step plots 30 10 bash -c plots

echo "== summary ($((SECONDS - START))s of ${BUDGET}s budget; logs and CSVs in $OUT)"
cat "$OUT/summary.txt"
# HFF_GPU_TAR=/path/gpu.tgz: everything under $OUT in one archive (for runners that fetch only a few files back)
if [[ -n "${HFF_GPU_TAR:-}" ]]; then tar czf "$HFF_GPU_TAR" -C "$OUT" . && echo "archive: $HFF_GPU_TAR"; fi
exit $((FAILED > 0))
