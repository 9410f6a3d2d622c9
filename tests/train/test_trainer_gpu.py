"""GPU tier: the trainer's compiled step (per-block torch.compile, bf16 autocast, torch's varlen attention on the packed
pairs) compiles during its first steps only; later steps, whose micro-batches have other lengths and row counts,
compile nothing. Skipped without CUDA."""

from pathlib import Path

import pytest
import torch

from hermesflow_fast.train import Trainer, load_config

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


def test_compiled_training_steps_do_not_recompile(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from torch._dynamo.utils import counters

    from hermesflow_fast.model.attention import torch_varlen_available

    backend = "varlen" if torch_varlen_available() else "auto"
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        "log.progress=false", "data.synthetic_pairs=96", "train.batch_size=6", "train.epochs=1",
        "data.token_budget=256", "model.compile=true", "model.dtype=bf16", f"model.attn_backend={backend}",
        "checkpoint.every=1000"])
    trainer = Trainer(cfg, run_dir=tmp_path / "run").setup()
    torch._dynamo.reset()
    counters.clear()
    for step in range(4):  # warm-up: the first shapes, the dynamic recompile, a one-row micro-batch
        trainer.train_step(step)
    warm = counters["stats"]["unique_graphs"]
    for step in range(4, 12):
        trainer.train_step(step)
    assert counters["stats"]["unique_graphs"] == warm
