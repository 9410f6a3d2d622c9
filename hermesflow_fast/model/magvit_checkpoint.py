"""MAGVIT-v2 checkpoints: reading weights files, mapping known key variants onto our layout, strict loading.

Checkpoint layout. The module names ARE the state-dict keys. Show-o's ``showlab/magvitv2`` (its ``MAGVITv2`` of
models/modeling_magvitv2.py: ``VQGANEncoder()``, ``VQGANDecoder()``, ``LFQuantizer()``) holds

    encoder.conv_in.{weight,bias}
    encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}.{weight,bias}     i = level, j = res-block
    encoder.down.{i}.downsample.conv.{weight,bias}                                       i < L−1
    encoder.mid.block_1.…   encoder.mid.attn_1.{norm,q,k,v,proj_out}.…   encoder.mid.block_2.…
    encoder.norm_out.…   encoder.conv_out.…   encoder.quant_conv.…
    decoder.conv_in.…   decoder.mid.block_1.…   decoder.mid.attn_1.…   decoder.mid.block_2.…
    decoder.up.{i}.block.{j}.…   decoder.up.{i}.upsample.conv.…  (i > 0)   decoder.norm_out.…   decoder.conv_out.…
    decoder.post_quant_conv.…
    quantize.embedding (2^C, C)   quantize.power_vals (C,)      the LFQ's fixed code table, as buffers

and our modules are named the same but for ``quant_conv.…`` / ``post_quant_conv.…`` at the top level (``mid.attn_1``
only with ``mid_attention``, ``post_quant_conv`` only with ``post_quant_conv``, as older folders of ours may lack them).

``decoder.up.{i}`` is level i counted from the finest resolution (it runs last), as in the VQGAN decoder.
``map_magvit_keys`` first rewrites a few known variants onto these names: a ``module.`` prefix (DDP),
``encoder.quant_conv`` → ``quant_conv``, ``decoder.post_quant_conv`` → ``post_quant_conv``, ``{enc,dec}oder.mid.{n}`` /
``mid_block.{n}`` → ``mid.block_{n+1}``, ``downsample.weight`` → ``downsample.conv.weight`` (and ``upsample``); it drops
the LFQ's buffers (``quantize.*``: the quantiser has no learned parameters; Show-o's two tables are checked against the
one this tokenizer decodes with first, ``check_lfq_buffers``) and training-only modules (``loss.*``,
``discriminator.*``, ``lpips.*``, ``perceptual_loss.*``): IGNORED_PREFIXES, the only keys left out. A learned codebook
(``quantize.*.weight``, a VQGAN's) is refused: such a model is not LFQ. ``load_magvit_state_dict`` then matches by
name, strictly:
every tensor's shape is checked before anything is copied, and a mismatch raises ``CheckpointError`` (a ``ValueError``)
naming the tensor, the checkpoint's shape and the model's shape, with the lists of missing and unexpected keys. One
leniency: a conv whose weight is present but whose bias is absent was built ``bias=False`` in the release and gets a
zero bias (the same function). ``.bin``/``.pt`` files go through ``torch.load(weights_only=True)``: a pickle that
carries code is refused; an unreadable (e.g. truncated) weights file, or a tensor the model loads holding NaN or ±inf,
is a ``CheckpointError`` naming the file (and the tensor). ``MAGVITv2.from_pretrained(path)`` takes the sizes from our
config.json if the folder has one (a size that config.json does not name is read off the tensors), else infers them
from the tensors' shapes (``MAGVITv2Config.from_state_dict``).

    python -m pytest -q tests/model/test_magvit.py tests/model/test_magvit_published.py
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from hermesflow_fast.model.weights import CheckpointError, load_state_dict_file
from hermesflow_fast.ops.lfq import lfq_codes

if TYPE_CHECKING:
    from hermesflow_fast.model.magvit import MAGVITv2

__all__ = ["IGNORED_PREFIXES", "TOKENIZER_TYPE", "check_lfq_buffers", "load_magvit_state_dict", "map_magvit_keys",
           "read_state_dict"]

TOKENIZER_TYPE = "magvitv2"  # config.json "tokenizer_type" of folders written by save_pretrained
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
IGNORED_PREFIXES = ("quantize.", "loss.", "discriminator.", "lpips.", "perceptual_loss.")


def read_magvit_config(path: Path) -> dict[str, Any] | None:
    """Our config.json next to the weights (``tokenizer_type: magvitv2``), or None (absent, or a release's own)."""
    file = (path if path.is_dir() else path.parent) / CONFIG_FILE
    if not file.is_file():
        return None
    try:
        d = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from exc
    return d if isinstance(d, dict) and d.get("tokenizer_type") == TOKENIZER_TYPE else None


def read_state_dict(path: str | os.PathLike, files: dict[str, Path] | None = None) -> dict[str, Tensor]:
    """A weights file (``.safetensors``, or ``.bin``/``.pt``/``.pth``/``.ckpt`` read with ``weights_only=True``) or a
    folder holding ``*.safetensors`` (all are merged) or else ``pytorch_model.bin`` → {name: CPU tensor}. ``files``,
    when given, is filled with the file each tensor came from. Errors are ``CheckpointError`` naming the file."""
    path = Path(path)
    if path.is_dir():
        paths = sorted(path.glob("*.safetensors"))
        if not paths and (path / "pytorch_model.bin").is_file():
            paths = [path / "pytorch_model.bin"]
        if not paths:
            raise CheckpointError(f"{path}: no *.safetensors or pytorch_model.bin in this folder (weights are "
                                  f"read from a local path only)")
    elif path.is_file():
        paths = [path]
    else:
        raise CheckpointError(f"{path}: no such file or folder (weights are read from a local path only)")
    sd: dict[str, Tensor] = {}
    for f in paths:
        part = load_state_dict_file(f)
        dup = sorted(set(sd) & set(part))
        if dup:
            raise CheckpointError(f"{f}: tensors {dup[:5]} are also in another weights file of {path}")
        sd.update(part)
        if files is not None:
            files.update(dict.fromkeys(part, f))
    return sd


_KEY_REWRITES: tuple[tuple[re.Pattern[str], Any], ...] = (
    (re.compile(r"^module\."), ""),
    (re.compile(r"^encoder\.quant_conv\."), "quant_conv."),
    (re.compile(r"^decoder\.post_quant_conv\."), "post_quant_conv."),
    (re.compile(r"^(encoder|decoder)\.(?:mid|mid_block)\.(\d+)\."), lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
    (re.compile(r"\.(downsample|upsample)\.(weight|bias)$"), r".\1.conv.\2"),
)


def map_key(key: str) -> str:
    """One checkpoint key with the known variants rewritten (``_KEY_REWRITES``)."""
    for pat, repl in _KEY_REWRITES:
        key = pat.sub(repl, key)
    return key


def map_magvit_keys(state_dict: Mapping[str, Tensor], source: str = "map_magvit_keys") -> dict[str, Tensor]:
    """Rewrite known key variants onto our layout (module docstring) and drop LFQ buffers and training-only modules.

    Raises CheckpointError (naming ``source``) when two source keys land on the same name or a key is a learned
    codebook (``quantize.*.weight``)."""
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state_dict.items():
        new = map_key(key)
        if new.startswith("quantize.") and new.endswith(".weight"):
            raise CheckpointError(f"{source}: {key!r} is a learned codebook (a VQ model's); MAGVIT-v2's LFQ has "
                                  f"none, so this checkpoint is not one this tokenizer can load")
        if new.startswith(IGNORED_PREFIXES):
            continue
        if new in out:
            raise CheckpointError(f"{source}: checkpoint keys {origin[new]!r} and {key!r} both map to {new!r}")
        out[new], origin[new] = value, key
    return out


def check_lfq_buffers(state_dict: Mapping[str, Tensor], z_channels: int, source: str = "state_dict") -> None:
    """Show-o's LFQuantizer keeps its code table as buffers, ``quantize.embedding`` (2^C, C): code i's ±1 bits, the
    most significant first, and ``quantize.power_vals`` (C,): 2^(C−1) … 1. This tokenizer recomputes both
    (ops/lfq.py); a checkpoint's copies, when present, must equal them, else codes would decode to other vectors.
    Raises CheckpointError naming ``source`` and the buffer."""
    for key, value in state_dict.items():
        name = map_key(key)
        if name == "quantize.embedding":
            shape: tuple[int, ...] = (2**z_channels, z_channels)
        elif name == "quantize.power_vals":
            shape = (z_channels,)
        else:
            continue
        same = tuple(value.shape) == shape
        if same:
            want = lfq_codes(torch.arange(shape[0]), z_channels) if len(shape) == 2 \
                else 2 ** torch.arange(z_channels - 1, -1, -1)
            same = torch.equal(value.detach().cpu().double(), want.double())
        if not same:
            raise CheckpointError(
                f"{source}: {key!r} {tuple(value.shape)} is not the LFQ table of {z_channels} bits this tokenizer "
                f"decodes with ({shape}, ±1 bits of each index, the most significant first): its codes would "
                f"decode to other vectors")


def load_magvit_state_dict(model: MAGVITv2, state_dict: Mapping[str, Tensor], source: str = "state_dict") -> None:
    """Copy a checkpoint (any known key variant) into ``model``, strictly by name.

    Raises CheckpointError (a ValueError) naming ``source`` and listing every shape mismatch (tensor, checkpoint shape,
    model shape), missing key and unexpected key; nothing is copied unless all match."""
    check_lfq_buffers(state_dict, model.config.z_channels, source)
    sd = map_magvit_keys(state_dict, source)
    own = model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in sd.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    zero_bias = [k for k in own if k not in sd and k.endswith(".bias") and k[: -len("bias")] + "weight" in sd
                 and isinstance(model.get_submodule(k.rsplit(".", 1)[0]), nn.Conv2d)]
    missing = sorted(set(own) - set(sd) - set(zero_bias))
    unexpected = sorted(set(sd) - set(own))
    if mismatched or missing or unexpected:
        parts = [f"{source}: the checkpoint does not fit MAGVITv2 with {model.config}"]
        for label, items in (("shape mismatches", mismatched), ("missing keys", missing),
                             ("unexpected keys", unexpected)):
            if items:
                more = f" … (+{len(items) - 20} more)" if len(items) > 20 else ""
                parts.append(f"{len(items)} {label}: " + "; ".join(items[:20]) + more)
        raise CheckpointError("\n".join(parts))
    bad_dtype = [k for k, v in sd.items() if not v.dtype.is_floating_point]
    if bad_dtype:
        raise CheckpointError(f"{source}: tensors {bad_dtype[:5]} are not floating point")
    with torch.no_grad():
        for k, p in own.items():
            if k in zero_bias:
                p.zero_()
            else:
                p.copy_(sd[k])
