"""hashed_seed / hashed_generator: sha256 of the key parts, the same in every process, and the keys the selfplay
stages, the evaluation and the gen masks draw from keep their streams.

    python -m pytest -q tests/test_seeding.py
"""

import hashlib
import subprocess
import sys

import torch

from hermesflow_fast.data.gen_mask import pair_generator
from hermesflow_fast.seeding import hashed_generator, hashed_seed
from hermesflow_fast.selfplay.stages import curation_generator as stage_generator
from hermesflow_fast.world.evaluate import eval_generator


def _by_hand(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def test_seed_is_sha256_of_the_joined_parts():
    assert hashed_seed("a", 1, "b") == _by_hand("a\x1f1\x1fb")
    assert hashed_seed("a", 1, "b") != hashed_seed("a", "1b")
    assert 0 <= hashed_seed("x") < 2**63
    assert hashed_seed("ü") == _by_hand("ü")  # UTF-8


def test_generator_draws_from_the_seed():
    a = torch.rand(4, generator=hashed_generator("k", 3))
    b = torch.rand(4, generator=torch.Generator().manual_seed(hashed_seed("k", 3)))
    assert torch.equal(a, b)
    assert hashed_generator("k", device="cpu").device == torch.device("cpu")


def test_same_seed_in_another_process():
    code = "from hermesflow_fast.seeding import hashed_seed; print(hashed_seed('p', 7, 'q'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == hashed_seed("p", 7, "q")


def test_callers_keep_their_keys():
    def seed(g: torch.Generator) -> int:
        return g.initial_seed()

    assert seed(stage_generator("r1", 2, "image", 5)) == _by_hand("selfplay\x1fimage\x1fr1\x1f2\x1f5")
    assert seed(eval_generator(5, "r1")) == _by_hand("evaluate\x1f5\x1fr1")
    assert seed(pair_generator("p0", 3, 9)) == _by_hand("hermesflow\x1fgen-mask\x1fp0\x1f3\x1f9")
    assert seed(pair_generator("p0", 3, 9, "text-dropout")) == _by_hand("hermesflow\x1ftext-dropout\x1fp0\x1f3\x1f9")
