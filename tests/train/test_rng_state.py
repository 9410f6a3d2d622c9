"""capture_rng_state / restore_rng_state: the draws after a restore are the ones after the capture (torch, numpy,
Python's random), and a damaged state is a CheckpointError naming where it came from.

    python -m pytest -q tests/train/test_rng_state.py
"""

import random

import numpy as np
import pytest
import torch

from hermesflow_fast.model.weights import CheckpointError
from hermesflow_fast.train.rng_state import capture_rng_state, restore_rng_state


def _draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(1).tolist(), random.random()


def test_restore_gives_the_same_draws():
    np.random.randn(1)  # a cached gauss value is part of numpy's state
    tensors, meta = capture_rng_state()
    first = _draws()
    _draws()
    restore_rng_state(tensors, meta, "here")
    assert _draws() == first


def test_a_damaged_state_names_where_it_came_from():
    tensors, meta = capture_rng_state()
    with pytest.raises(CheckpointError, match=r"^rng-rank0\.safetensors: not a valid RNG state file"):
        restore_rng_state({k: v for k, v in tensors.items() if k != "numpy_keys"}, meta, "rng-rank0.safetensors")
