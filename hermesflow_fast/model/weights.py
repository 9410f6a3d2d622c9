"""Loading and saving the unified transformer: HF Phi layout, Show-o's layout, ours (= HF Phi's).

    folder/config.json                      HF PhiConfig keys (ours adds a "hermesflow" block), or Show-o's wrapper
                                            config (vocab_size over phi-1.5's sizes)
    folder/model.safetensors                or model-0000x-of-0000y.safetensors + model.safetensors.index.json,
    folder/pytorch_model.bin                or pytorch_model-0000x….bin + pytorch_model.bin.index.json

Keys: ``model.layers.N.self_attn.q_proj.weight`` … (HF Phi, ours), the same under ``showo.`` (Show-o), optionally
behind a ``module.`` prefix (a DDP save). Nothing is unpickled beyond tensors: ``.bin``/``.pt`` files go through
``torch.load(weights_only=True)``, so a pickle carrying code is refused. Every tensor's shape is checked against the
config before anything is copied; a mismatch names the tensor and both shapes. A weights file that cannot be read
(truncated, not safetensors, a missing shard of a sharded checkpoint) is a ``CheckpointError`` naming the file, and a
tensor the model would load holding NaN or ±inf is refused naming the tensor and its file (``check_finite``: one sum
per tensor in its own dtype, an exact count only when that sum is not finite).
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hermesflow_fast.errors import UserError
from hermesflow_fast.io import atomic_path, write_atomic
from hermesflow_fast.model.config import ModelConfig

__all__ = ["CheckpointError", "check_finite", "load_pretrained", "load_state_dict_file", "map_keys",
           "read_state_dict", "save_pretrained"]

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old Phi checkpoints carry


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded as asked: the message names the file/tensor and what was expected."""


def load_state_dict_file(file: str | os.PathLike) -> dict[str, Tensor]:
    """One weights file → {name: tensor}; safetensors, or a tensors-only pickle (``weights_only=True``)."""
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"{file}: no such file")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad header
            raise CheckpointError(f"{file}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    try:
        sd = torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{file}: refused to unpickle: only tensors and plain containers are loaded (torch.load with "
            f"weights_only=True), and this file carries other objects or code, or is corrupt ({first})"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{file}: not a readable torch weights file ({type(exc).__name__}: {exc})") from exc
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]  # a Lightning-style checkpoint
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{file}: expected a mapping of name → tensor, got {type(sd).__name__}")
    return dict(sd)


def read_state_dict(path: str | os.PathLike, files: dict[str, Path] | None = None) -> dict[str, Tensor]:
    """A weights file, or a folder holding one (single file or sharded with an index). ``files``, when given, is
    filled with the file each tensor came from."""
    path = Path(path)
    if path.is_file():
        return _read_files([path], files)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or folder")
    for name in _INDEX_FILES:
        index = path / name
        if index.is_file():
            return _read_files([path / s for s in _index_shards(index)], files)
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            return _read_files([path / name], files)
    found = sorted(p.name for p in path.iterdir())[:20]
    raise CheckpointError(f"{path}: no weights file ({', '.join(_WEIGHT_FILES)} or a sharded index); found {found}")


def _index_shards(index: Path) -> list[str]:
    """The shard file names of a sharded checkpoint's index (``weight_map`` values), sorted."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{index}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
    except (UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a sharded-checkpoint index (a JSON object with a \"weight_map\" of "
                              f"tensor name → shard file): {type(exc).__name__}: {exc}") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: \"weight_map\" must map tensor names to shard file names")
    return sorted(set(weight_map.values()))


def _read_files(paths: list[Path], files: dict[str, Path] | None) -> dict[str, Tensor]:
    sd: dict[str, Tensor] = {}
    for file in paths:
        part = load_state_dict_file(file)
        if files is not None:
            files.update(dict.fromkeys(part, file))
        sd.update(part)
    return sd


def _nonfinite(t: Tensor) -> int:
    """How many values of ``t`` are NaN or ±inf (0 for integer tensors). A NaN or inf makes the sum non-finite, so a
    finite sum (one vectorised pass in the tensor's dtype) clears the tensor; only a non-finite sum (a bad value, or
    an overflow of the sum itself) pays for the exact count."""
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return 0
    if bool(torch.isfinite(t.sum())):
        return 0
    return int((~torch.isfinite(t)).sum())


def check_finite(state_dict: Mapping[str, Tensor], files: Mapping[str, str | os.PathLike] | str | os.PathLike
                 ) -> None:
    """Raise ``CheckpointError`` naming the first tensor holding NaN or ±inf and its file (``files``: one path for
    all, or tensor name → path)."""
    for name, t in state_dict.items():
        bad = _nonfinite(t)
        if bad:
            file = files.get(name, "?") if isinstance(files, Mapping) else files
            raise CheckpointError(f"{file}: tensor {name!r} holds {bad:,} non-finite value(s) (NaN or ±inf) of "
                                  f"{t.numel():,}; these weights cannot be trained or sampled from")


def map_keys(sd: dict[str, Tensor], where: str = "checkpoint") -> tuple[dict[str, Tensor], str, list[str]]:
    """Strip Show-o's ``showo.`` / DDP's ``module.`` prefixes → (our keys, layout name, keys left out)."""
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith("showo.") for k in sd):
        layout = "show-o"
        ours = {k[len("showo."):]: v for k, v in sd.items() if k.startswith("showo.")}
        left = sorted(k for k in sd if not k.startswith("showo."))
    else:
        layout, ours, left = "phi", dict(sd), []
    dropped = [k for k in ours if k.endswith(_IGNORED_SUFFIXES)]
    for k in dropped:
        del ours[k]
    if not ours:
        raise CheckpointError(f"{where}: no transformer weights found (keys start with {sorted(sd)[:5]})")
    return ours, layout, left + dropped


def _read_config(path: Path) -> dict[str, Any] | None:
    file = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc


def load_pretrained(cls, path, config: ModelConfig | None = None, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu", strict: bool = True):
    """Build ``cls(config)`` and fill it from ``path`` (see the module docstring for the layouts)."""
    path = Path(path)
    if config is None:
        raw = _read_config(path)
        if raw is None:
            raise CheckpointError(f"{path}: no config.json beside the weights; pass config=ModelConfig(...)")
        config = ModelConfig.from_dict(raw, where=str(path / "config.json" if path.is_dir() else path))
    files: dict[str, Path] = {}
    sd, layout, left = map_keys(read_state_dict(path, files), where=str(path))
    model = cls(config)
    expected = model.state_dict()
    check_finite({k: v for k, v in sd.items() if k in expected},
                 {k: next((files[o] for o in (k, f"showo.{k}", f"module.{k}", f"module.showo.{k}") if o in files), path)
                  for k in sd})
    for name, t in sd.items():
        if name in expected and tuple(t.shape) != tuple(expected[name].shape):
            hint = ""
            if name.endswith(("embed_tokens.weight", "lm_head.weight", "lm_head.bias")):
                hint = f" (vocab: config has vocab_size {config.vocab_size}, checkpoint has {t.shape[0]})"
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(t.shape)} in the checkpoint but "
                f"{tuple(expected[name].shape)} in the model config{hint}"
            )
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path} ({layout} layout): {len(missing)} missing tensors {missing[:8]}, "
            f"{len(unexpected)} unexpected tensors {unexpected[:8]}"
        )
    model.load_state_dict(sd, strict=strict)
    model.loaded_from = {"path": str(path), "layout": layout, "ignored_keys": left}
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def save_pretrained(model, path: str | os.PathLike) -> None:
    """``config.json`` + ``model.safetensors``, written beside each other in a temp name then renamed."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path / "model.safetensors") as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
    write_atomic(path / "config.json", json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
