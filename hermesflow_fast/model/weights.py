"""Loading and saving the unified transformer: HF Phi layout, Show-o's layout, ours (= HF Phi's).

    folder/config.json      HF PhiConfig keys (ours adds a "hermesflow" block), or Show-o's wrapper config: its
                            vocab_size over the sizes of its llm_model_path (a local Phi folder's config.json, else
                            phi-1.5's for microsoft/phi-1_5)
    folder/<weights>        the first of these that exists (WEIGHT_FILES):
        model.safetensors.index.json + model-0000k-of-0000n.safetensors              HF transformers, sharded
        diffusion_pytorch_model.safetensors.index.json + pytorch_model-0000k-of-0000n.safetensors
                                                                                     Show-o's ModelMixin, sharded
        pytorch_model.bin.index.json + pytorch_model-0000k-of-0000n.bin              HF transformers, sharded .bin
        diffusion_pytorch_model.bin.index.json + pytorch_model-0000k-of-0000n.bin    Show-o, sharded .bin
        model.safetensors                                                            HF transformers, ours
        pytorch_model.safetensors        Show-o's ModelMixin.save_pretrained (safe_serialization=True, its default)
        pytorch_model.bin                Show-o with safe_serialization=False (its training checkpoints), older HF
        model.pt
    and, when none of those exists, the same names saved with ``variant=v`` (``pytorch_model.v.safetensors``,
    ``diffusion_pytorch_model.safetensors.index.v.json`` …) if the folder holds exactly one variant.

``path`` may also be one weights file or one index file. Keys: ``model.layers.N.self_attn.q_proj.weight`` … (HF Phi,
ours), the same under ``showo.`` (Show-o), optionally behind a ``module.`` prefix (a DDP save). No tensor is dropped
silently: the only keys left out are the rotary ``inv_freq`` buffers some Phi checkpoints carry (IGNORED_SUFFIXES,
recomputed from the config; ``loaded_from["ignored_keys"]`` lists them). Show-o's CLIP-ViT projector
(``mm_projector.*``, its ``w_clip_vit`` variants) is refused with why, and so is any other tensor the model has no
place for. Nothing is unpickled beyond tensors: ``.bin``/``.pt`` files go through ``torch.load(weights_only=True)``,
so a pickle carrying code is refused. Every tensor's shape is checked against the config before anything is copied;
a mismatch names the tensor and both shapes. A weights file that cannot be read (truncated, not safetensors, a missing
shard of a sharded checkpoint) is a ``CheckpointError`` naming the file, and a tensor the model would load holding
NaN or ±inf is refused naming the tensor and its file (``check_finite``: one sum per tensor in its own dtype, an
exact count only when that sum is not finite).
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from hermesflow_fast.errors import UserError
from hermesflow_fast.io import atomic_path, write_atomic
from hermesflow_fast.model.config import ModelConfig

__all__ = ["CLIP_PROJECTOR_PREFIX", "IGNORED_SUFFIXES", "WEIGHT_FILES", "CheckpointError", "check_finite",
           "load_pretrained", "load_state_dict_file", "map_keys", "read_model_config", "read_state_dict",
           "read_json_object", "save_pretrained", "weights_file"]

M = TypeVar("M", bound=nn.Module)

_INDEX_FILES = ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json",
                "pytorch_model.bin.index.json", "diffusion_pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.safetensors", "pytorch_model.bin", "model.pt")
WEIGHT_FILES = _INDEX_FILES + _SINGLE_FILES  # looked for in this order
_VARIANT_NAMES = tuple(re.compile(p) for p in (  # WEIGHT_FILES saved with variant=v, in the same order
    r"^(?:model|diffusion_pytorch_model)\.safetensors\.index\.(?P<v>[^.]+)\.json$",
    r"^(?:pytorch_model|diffusion_pytorch_model)\.bin\.index\.(?P<v>[^.]+)\.json$",
    r"^(?:model|pytorch_model)\.(?P<v>[^.]+)\.safetensors$",
    r"^pytorch_model\.(?P<v>[^.]+)\.bin$",
))
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some Phi checkpoints carry; recomputed from the config
CLIP_PROJECTOR_PREFIX = "mm_projector."  # Show-o's w_clip_vit variants: Linear(1024→2048), GELU, Linear(2048→2048)
_CLIP_WHY = ("this model reads images as VQ tokens (MAGVIT-v2 codes) for understanding; Show-o's CLIP-ViT variant "
             "(w_clip_vit) is not supported")


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
    """A weights file, an index file of a sharded checkpoint, or a folder holding either under one of the names in
    the module docstring → {name: tensor}. ``files``, when given, is filled with the file each tensor came from."""
    path = Path(path)
    if path.is_file():
        if path.name.endswith(".json"):
            return _read_files([path.parent / s for s in _index_shards(path)], files)
        return _read_files([path], files)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or folder")
    found = weights_file(path)
    if found.name.endswith(".json"):
        return _read_files([path / s for s in _index_shards(found)], files)
    return _read_files([found], files)


def weights_file(folder: str | os.PathLike) -> Path:
    """The weights file (or shard index) ``read_state_dict`` reads in ``folder``: the first of WEIGHT_FILES there,
    else the one variant (``save_pretrained(variant=…)``) of them there; CheckpointError naming what was looked for."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    variants: dict[str, tuple[int, str]] = {}
    for name in names:
        for rank, pat in enumerate(_VARIANT_NAMES):
            m = pat.match(name)
            if m and (m["v"] not in variants or rank < variants[m["v"]][0]):
                variants[m["v"]] = (rank, name)
    if len(variants) == 1:
        return folder / next(iter(variants.values()))[1]
    if variants:
        raise CheckpointError(f"{folder}: weights of several variants {sorted(variants)} "
                              f"({sorted(n for _, n in variants.values())}); pass the one file (or index) to load")
    raise CheckpointError(f"{folder}: no weights file; looked for {', '.join(WEIGHT_FILES)} and their variant forms "
                          f"(pytorch_model.<variant>.safetensors, diffusion_pytorch_model.safetensors.index."
                          f"<variant>.json …); found {names[:20]}")


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
    origin: dict[str, Path] = {}
    for file in paths:
        part = load_state_dict_file(file)
        dup = sorted(set(part) & set(sd))
        if dup:
            raise CheckpointError(f"{file}: tensors {dup[:5]} are also in {origin[dup[0]]}; a tensor belongs to one "
                                  f"shard")
        origin.update(dict.fromkeys(part, file))
        sd.update(part)
    if files is not None:
        files.update(origin)
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



def map_keys(sd: Mapping[str, Tensor], where: str = "checkpoint", files: Mapping[str, str | os.PathLike] | None = None
             ) -> tuple[dict[str, Tensor], str, list[str]]:
    """Strip Show-o's ``showo.`` / DDP's ``module.`` prefixes → (our keys, layout name, keys left out).

    Left out are only the IGNORED_SUFFIXES buffers. Show-o's CLIP-ViT projector (``mm_projector.*``) and, in Show-o's
    layout, any other tensor outside ``showo.`` raise ``CheckpointError`` naming the file (``files``: source key →
    file, else ``where``), the keys and why."""
    def file_of(key: str) -> str:
        return str(files.get(key, where)) if files is not None else where

    ddp = bool(sd) and all(k.startswith("module.") for k in sd)
    names = {k: k[len("module."):] if ddp else k for k in sd}  # source key → key without the DDP prefix
    projector = sorted(k for k, n in names.items() if n.startswith(CLIP_PROJECTOR_PREFIX))
    if projector:
        raise CheckpointError(
            f"{file_of(projector[0])}: {len(projector)} tensors under {CLIP_PROJECTOR_PREFIX}* (the CLIP-ViT "
            f"projector of a Show-o w_clip_vit checkpoint) would be dropped: {_CLIP_WHY}")
    layout = "show-o" if any(n.startswith("showo.") for n in names.values()) else "phi"
    ours: dict[str, Tensor] = {}
    ignored: list[str] = []
    outside: list[str] = []
    for key, name in names.items():
        if layout == "show-o":
            if not name.startswith("showo."):
                outside.append(key)
                continue
            name = name[len("showo."):]
        if name.endswith(IGNORED_SUFFIXES):
            ignored.append(key)
        else:
            ours[name] = sd[key]
    if outside:
        outside.sort()
        raise CheckpointError(f"{file_of(outside[0])}: {len(outside)} tensors outside Show-o's transformer (not "
                              f"under showo.): {outside[:8]}; this loader would drop them, so it refuses the file")
    if not ours:
        raise CheckpointError(f"{where}: no transformer weights found (keys start with {sorted(sd)[:5]})")
    return ours, layout, sorted(ignored)


def read_json_object(file: Path) -> dict[str, Any]:
    """A JSON object read from ``file``; CheckpointError naming file and line when it is not one."""
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not isinstance(d, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(d).__name__}")
    return d


_PHI_15_NAMES = ("phi-1_5", "phi-1.5")  # llm_model_path names whose sizes ModelConfig's defaults are


def _llm_config(raw: dict[str, Any], file: Path) -> tuple[dict[str, Any], str]:
    """Show-o's wrapper config → the Phi config it stands for, as Show-o builds it: ``AutoConfig.from_pretrained(
    llm_model_path)`` with the vocabulary resized to the wrapper's ``vocab_size``. A local folder is read; a path not
    here (a hub id, another machine's folder) is phi-1.5's when its name says phi-1_5, else refused."""
    llm = str(raw.get("llm_model_path") or "")
    local = Path(llm).expanduser() / "config.json" if llm else None
    if local is not None and local.is_file():
        phi = read_json_object(local)
        if "vocab_size" in raw:
            phi["vocab_size"] = raw["vocab_size"]
        return phi, f"{local} (llm_model_path of {file})"
    if llm.rstrip("/").rsplit("/", 1)[-1].lower() in _PHI_15_NAMES:
        return raw, str(file)
    raise CheckpointError(f"{file}: llm_model_path {llm!r} is neither a local folder with a config.json nor "
                          f"microsoft/phi-1_5 (whose sizes are known); point it at a local copy of the Phi model or "
                          f"pass config=ModelConfig(...)")


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of the checkpoint at ``path`` (a folder, or a file whose folder holds it) from its config.json:
    ours / HF Phi's, or Show-o's wrapper (``_llm_config``). A Show-o ``w_clip_vit: true`` config is refused; every
    problem is a ``CheckpointError`` naming the file."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: no config.json beside the weights; pass config=ModelConfig(...)")
    raw = read_json_object(file)
    if raw.get("w_clip_vit"):
        raise CheckpointError(f"{file}: w_clip_vit is true: a Show-o CLIP-ViT checkpoint, whose "
                              f"{CLIP_PROJECTOR_PREFIX}* weights (the CLIP-ViT projector) this loader would drop: "
                              f"{_CLIP_WHY}")
    where = str(file)
    if "llm_model_path" in raw:
        raw, where = _llm_config(raw, file)
    try:
        return ModelConfig.from_dict(raw, where=where)
    except UserError:
        raise
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        raise CheckpointError(msg if msg.startswith(where) else f"{where}: {msg}") from exc


def load_pretrained(cls: Callable[[ModelConfig], M], path: str | os.PathLike, config: ModelConfig | None = None,
                    dtype: torch.dtype | None = None, device: torch.device | str = "cpu", strict: bool = True) -> M:
    """Build ``cls(config)`` and fill it from ``path`` (see the module docstring for the layouts).

    ``config`` None: ``read_model_config(path)``. A tensor the model has no place for is always refused; a tensor the
    model has but the checkpoint lacks is refused too unless ``strict=False``, which keeps its initial value and lists
    it in ``loaded_from["missing_keys"]``."""
    path = Path(path)
    if config is None:
        config = read_model_config(path)
    files: dict[str, Path] = {}
    sd, layout, ignored = map_keys(read_state_dict(path, files), where=str(path), files=files)

    def file_of(name: str) -> Path:
        return next((files[o] for o in (name, f"showo.{name}", f"module.{name}", f"module.showo.{name}")
                     if o in files), path)

    model = cls(config)
    expected = model.state_dict()
    check_finite({k: v for k, v in sd.items() if k in expected}, {k: file_of(k) for k in sd})
    for name, t in sd.items():
        if name in expected and tuple(t.shape) != tuple(expected[name].shape):
            hint = ""
            if name.endswith(("embed_tokens.weight", "lm_head.weight", "lm_head.bias")):
                hint = f" (vocab: config has vocab_size {config.vocab_size}, checkpoint has {t.shape[0]})"
            raise CheckpointError(
                f"{file_of(name)}: tensor {name!r} has shape {tuple(t.shape)} in the checkpoint but "
                f"{tuple(expected[name].shape)} in the model config{hint}"
            )
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if unexpected or (strict and missing):
        where = file_of(unexpected[0]) if unexpected else path
        raise CheckpointError(
            f"{where} ({layout} layout): {len(missing)} missing tensors {missing[:8]}, {len(unexpected)} "
            f"unexpected tensors {unexpected[:8]} (the model has no place for these; nothing is dropped silently)"
        )
    model.load_state_dict(sd, strict=not missing)
    model.loaded_from = {"path": str(path), "layout": layout, "ignored_keys": ignored, "missing_keys": missing,
                         "files": sorted({str(f) for f in files.values()})}
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def save_pretrained(model: nn.Module, path: str | os.PathLike) -> None:
    """``config.json`` + ``model.safetensors``, written beside each other in a temp name then renamed."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path / "model.safetensors") as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
    write_atomic(path / "config.json", json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
