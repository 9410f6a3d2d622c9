"""ModelConfig.forward_flops, the one FLOP count behind MFU (trainer and bench/bench_step.py): a hand count for a
tiny config, the matmul FLOPs torch's FlopCounterMode sees in a real forward, and Show-o's 1.328 B matmul weights.

    python -m pytest -q tests/model/test_model_config.py
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hermesflow_fast.model import ModelConfig, UnifiedTransformer

TINY = dict(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=2, num_attention_heads=1)


def test_forward_flops_hand_count():
    c = ModelConfig(**TINY)
    # per layer q, k, v, dense 4·(4·4) + fc1 4·8 + fc2 8·4 = 128 weights; 2 layers 256; head 10·4 = 40 weights
    assert c.forward_flops(1) == 2 * (256 + 40) == 592
    assert c.forward_flops(3, head_rows=2) == 2 * 256 * 3 + 2 * 40 * 2 == 1696
    assert c.forward_flops(5, head_rows=0) == 2 * 256 * 5
    assert c.forward_flops(0, head_rows=1) == 80


def test_forward_flops_are_the_matmuls_of_a_real_forward():
    c = ModelConfig.tiny(vocab_size=50, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=2, attn_backend="sdpa")
    model = UnifiedTransformer(c).eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.logits(ids)
    linear = sum(v for k, v in fc.get_flop_counts()["Global"].items() if str(k) in ("aten.addmm", "aten.mm"))
    assert linear == c.forward_flops(2 * 7)


def test_show_o_matmul_weights():
    # phi-1.5 blocks 1.208 B + the 58,498 × 2048 head (reference/perf-anchors.md §1.1)
    assert ModelConfig.show_o_512().forward_flops(1) / 2 == pytest.approx(1.328e9, rel=1e-3)
    assert ModelConfig.show_o_512().forward_flops(1, head_rows=0) / 2 == pytest.approx(1.208e9, rel=1e-3)
