"""Generators seeded by a stable hash of a key, so a draw depends on the key alone: not on the process, the rank, the
batch it lands in or how many draws came before.

    seed = int.from_bytes(sha256("\\x1f".join(str(p) for p in parts))[:8], "little") & (2⁶³ − 1)

``torch.Generator.manual_seed`` then gives the same stream on every machine and run (Python's ``hash`` is salted per
process, which is why it is not used).

    python -m pytest -q tests/test_seeding.py
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["hashed_generator", "hashed_seed"]


def hashed_seed(*parts: object) -> int:
    """A 63-bit seed from the sha256 of ``parts`` (each as ``str``, joined by the unit separator ``\\x1f``)."""
    key = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def hashed_generator(*parts: object, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded by ``hashed_seed(*parts)``."""
    g = torch.Generator(device)
    g.manual_seed(hashed_seed(*parts))
    return g
