"""Smoke test of bench/demo_rows.py: a finished self-play run's summary becomes per-round und / gen / gap rows."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is a top-level folder, not part of the installed package
    sys.path.insert(0, str(ROOT))

from bench import demo_rows  # noqa: E402
from hermesflow_fast.benchmarks import harness  # noqa: E402


def test_demo_rows_read_a_finished_run(tmp_path):
    from hermesflow_fast.selfplay.config import SelfPlayConfig
    from hermesflow_fast.train.config import load_config, save_config

    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(None, [], schema=SelfPlayConfig), run / "config.yaml")
    rounds = [{"round": 0, "und": 0.9, "gen": 0.6, "gap": 0.3, "gen_std": 0.01},
              {"round": 1, "und": 0.9, "gen": 0.7, "gap": 0.2, "gen_std": 0.02}]
    (run / "summary.json").write_text(json.dumps({"rounds": rounds}))
    rows = demo_rows.main([str(run), "--out", str(tmp_path / "d.csv"), "--wall-s", "300"])
    assert [(r["kernel_provider"], r["metric_name"]) for r in rows][:3] == [("round 0", "und"), ("round 0", "gen"),
                                                                           ("round 0", "gap")]
    gen1 = next(r for r in rows if r["kernel_provider"] == "round 1" and r["metric_name"] == "gen")
    assert (gen1["y_value_50"], gen1["y_value_20"], gen1["y_value_80"]) == (0.7, 0.7 - 0.02, 0.7 + 0.02)
    assert len(harness.read_rows(tmp_path / "d.csv")) == 6 and json.loads(gen1["extra_benchmark_config_str"])[
        "wall_s"] == 300
