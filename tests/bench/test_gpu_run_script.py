"""bench/gpu/run.sh, the one call a CUDA machine gets: valid bash, the measurements the GPU path is judged by first
(the training step with every lever, the head in bf16 with peak memory, curation at Show-o-512), then the GPU test
tier, all inside a budget under 9 minutes."""

import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu" / "run.sh"


def test_run_sh_is_valid_bash_and_orders_the_judged_steps_first():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    steps = re.findall(r"^\s*step (\w+) (\d+)", text, flags=re.M)
    names = [n for n, _ in steps]
    assert names[:6] == ["env", "build", "bench_step", "bench_bf16", "bench_cur", "pytest"], names
    budget = int(re.search(r'HFF_GPU_BUDGET_S:-(\d+)', text).group(1))
    assert budget <= 540
    judged = dict(steps)
    assert sum(int(judged[n]) for n in ("env", "build", "bench_step", "bench_bf16", "bench_cur", "pytest")) <= budget
    step_cmd = text[text.index("step bench_step"):text.index("step bench_bf16")]
    assert "--compile" in step_cmd and "--no-compile" not in step_cmd and "show_o_512" in step_cmd
