"""One process's RNG state as tensors + JSON, exactly: torch CPU, the current CUDA device, numpy, Python's random.

    tensors, meta = capture_rng_state()      # tensors for a safetensors file, meta (str → str) for its metadata
    restore_rng_state(tensors, meta, where)  # the same draws follow; CheckpointError naming ``where`` if invalid

Training checkpoints (train/checkpoint.py) write one such file per rank, so a resumed run draws what it would have.

    python -m pytest -q tests/train/test_checkpoint.py
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import torch
from torch import Tensor

from hermesflow_fast.model.weights import CheckpointError

__all__ = ["capture_rng_state", "restore_rng_state"]


def capture_rng_state() -> tuple[dict[str, Tensor], dict[str, str]]:
    """This process's RNG state: tensors {"torch_cpu", "cuda" (the current device, when CUDA is initialized),
    "numpy_keys"} and JSON metadata {"numpy": position/gauss, "python": random.getstate(), "cuda_device"}."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    meta: dict[str, str] = {}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = torch.cuda.current_device()
        tensors["cuda"] = torch.cuda.get_rng_state(device)
        meta["cuda_device"] = str(device)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    meta["numpy"] = json.dumps({"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)})
    version, internal, gauss_next = random.getstate()
    meta["python"] = json.dumps({"version": version, "internal": list(internal), "gauss_next": gauss_next})
    return tensors, meta


def restore_rng_state(tensors: dict[str, Tensor], meta: dict[str, str], where: str | os.PathLike) -> None:
    """Set this process's RNGs from ``capture_rng_state()``'s output; CheckpointError naming ``where`` (the file it
    came from) when it is not a valid state."""
    try:
        torch.set_rng_state(tensors["torch_cpu"])
        if "cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["cuda"], torch.cuda.current_device())
        np_meta = json.loads(meta["numpy"])
        keys = tensors["numpy_keys"].numpy().astype(np.uint32)
        np.random.set_state((np_meta["kind"], keys, np_meta["pos"], np_meta["has_gauss"], np_meta["cached"]))
        py = json.loads(meta["python"])
        random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: not a valid RNG state file ({type(exc).__name__}: {exc})") from exc
