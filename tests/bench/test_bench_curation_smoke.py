"""Smoke test of bench/bench_curation.py at the "tiny" preset (a random model around the world, its own image grid
and codebook) in bf16: both passes run and append one records/s row each, with the preset's shapes (and the
baseline's CFG batching) recorded."""

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is a top-level folder, not part of the installed package
    sys.path.insert(0, str(ROOT))

from bench import bench_curation  # noqa: E402
from hermesflow_fast.benchmarks import harness  # noqa: E402


def test_preset_world_keeps_the_world_and_swaps_the_model():
    from hermesflow_fast.world import make_records
    from hermesflow_fast.world.shipped import load_base

    base = load_base()
    wm = bench_curation.preset_world(base, **bench_curation.PRESETS["tiny"])
    assert wm.num_image_tokens == 16 * 16 and wm.vocab.num_image_codes == 512
    assert wm.vocab.image_offset == base.vocab.image_offset and wm.text_tokenizer is base.text_tokenizer
    assert wm.model.config.hidden_size == 64 and wm.model.lm_head.weight.shape[0] == wm.vocab.vocab_size
    recs = bench_curation.curation_records(wm, make_records(2, 1, "train"))
    assert recs[0].image_codes.shape == (256,) and int(recs[0].image_codes.max()) < 512


def test_bf16_tiny_preset_rows(tmp_path):
    out = tmp_path / "curation.csv"
    torch.set_grad_enabled(False)
    try:
        rows = bench_curation.main(["--preset", "tiny", "--dtype", "bf16", "--records", "2", "--images", "2",
                                    "--steps", "2", "--captions", "two", "--threads", "1", "--baseline-cfg", "separate",
                                    "--out", str(out)])
    finally:
        torch.set_grad_enabled(True)
    assert [r["kernel_provider"] for r in rows] == ["hermesflow", "ours"]
    got = harness.read_rows(out)
    assert len(got) == 2 and all(r["dtype"] == "bf16" and float(r["y_value_50"]) > 0 for r in got)
    cfg = json.loads(got[0]["extra_benchmark_config_str"])
    assert cfg["preset"] == "tiny" and cfg["image_tokens"] == 256 and cfg["d"] == 64
    assert cfg["baseline_cfg"] == "separate"
    for row in got:  # each side's time split by stage, under the same names
        split = json.loads(row["extra_benchmark_config_str"])["stage_seconds"]
        assert set(split) == {"captions", "images", "self_vqa"} and all(v > 0 for v in split.values())
