"""MAGVIT-v2 image tokenizer as Show-o uses it (weights ``showlab/magvitv2``, read from a local path only).

    encode:  x (B, 3, H, W) in [−1, 1]
             → conv_in (3→ch) → L levels of res-blocks, a stride-2 conv after each level but the last (stride 2^(L−1))
             → mid: res-block, [self-attention], res-block → GroupNorm → swish → conv_out (→ z_channels)
             → quant_conv (1×1)                                                                    z (B, C, h, w)
             → LFQ: index = Σ_c [z_c > 0] · 2^(C−1−c), channel 0 the most significant bit         (B, h, w) int64
             → flattened row-major over (h, w)                                                    (B, h·w)
    decode:  codes (B, N) → ±1 code vectors (lfq_codes) (B, C, h, w), h = w = √N unless shape=(h, w) is given
             → [post_quant_conv (1×1)] → conv_in (C→ch·mult[−1]) → mid: res-block, [self-attention], res-block
             → L levels of res-blocks, nearest ×2 upsampling + 3×3 conv after each level but the finest
             → GroupNorm → swish → conv_out (→ 3) → clamp [−1, 1]

Res-block: h = conv2(swish(norm2(conv1(swish(norm1(x)))))); out = shortcut(x) + h, the shortcut a 1×1 conv
(``nin_shortcut``) where the channel count changes. Self-attention (``mid.attn_1``): one head over the h·w positions,
q, k, v and proj_out 1×1 convs after a GroupNorm, scale C^−½, added to its input. Down-sampling pads right/bottom by
one then runs a 3×3 stride-2 conv without padding; GroupNorm has 32 groups and eps 1e-6. Show-o's tokenizer, the
default config (bracketed parts included): ch 128, encoder multipliers (1, 2, 2, 4, 4) with (4, 3, 4, 3, 4)
res-blocks, decoder multipliers (1, 1, 2, 2, 4) with (4, 4, 3, 4, 3) res-blocks, C = 13 (8192 codes), stride 16:
256² → 16×16 = 256 codes, 512² → 32×32 = 1024 codes.

Checkpoints (model/magvit_checkpoint.py): the module names are the state-dict keys of Show-o's release but for
``quant_conv`` / ``post_quant_conv``, which sit at the top level here (``encoder.quant_conv`` /
``decoder.post_quant_conv`` there); ``MAGVITv2.from_pretrained(path)`` maps the known key variants onto our names and
loads strictly, and ``save_pretrained`` writes our config.json + model.safetensors.

    python -m pytest -q tests/model/test_magvit.py tests/model/test_magvit_published.py
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hermesflow_fast.model.magvit_checkpoint import (
    CONFIG_FILE,
    IGNORED_PREFIXES,
    TOKENIZER_TYPE,
    WEIGHTS_FILE,
    check_lfq_buffers,
    load_magvit_state_dict,
    map_key,
    map_magvit_keys,
    read_magvit_config,
    read_state_dict,
)
from hermesflow_fast.model.weights import CheckpointError, check_finite
from hermesflow_fast.ops.lfq import lfq_codes, lfq_quantize

__all__ = [
    "MAGVITv2",
    "MAGVITv2Config",
    "TOKENIZER_TYPE",
    "check_code_grid",
    "images_to_uint8",
    "load_magvit_state_dict",
    "map_magvit_keys",
    "read_state_dict",
]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# the sizes MAGVITv2Config.from_state_dict reads off a checkpoint's tensors
_READ_OFF_TENSORS = ("ch", "in_channels", "encoder_ch_mult", "encoder_num_res_blocks", "decoder_ch_mult",
                     "decoder_num_res_blocks", "num_mid_blocks", "mid_attention", "z_channels", "conv_out_kernel",
                     "post_quant_conv", "out_channels")


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MAGVITv2Config:
    """Sizes of the tokenizer; the defaults are Show-o's ``showlab/magvitv2`` exactly: its ``MAGVITv2()`` builds
    ``VQGANEncoder()`` / ``VQGANDecoder()`` with their default arguments (models/modeling_magvitv2.py), which have
    a self-attention block between the two mid res-blocks of the encoder and of the decoder, a 1×1 ``quant_conv``
    after the encoder and a 1×1 ``post_quant_conv`` before the decoder, and no attention inside the levels
    (``attn_resolutions=[5]`` matches none of 256, 128, 64, 32, 16). Folders saved with other flags (our config.json
    says so, or the tensors do) load as they were written."""

    ch: int = 128
    encoder_ch_mult: tuple[int, ...] = (1, 2, 2, 4, 4)
    encoder_num_res_blocks: tuple[int, ...] = (4, 3, 4, 3, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_num_res_blocks: tuple[int, ...] = (4, 4, 3, 4, 3)
    num_mid_blocks: int = 2
    mid_attention: bool = True  # mid.attn_1 between mid.block_1 and mid.block_2, in the encoder and the decoder
    z_channels: int = 13  # LFQ bits: 2^13 = 8192 codes
    conv_out_kernel: int = 3  # encoder.conv_out kernel size (1 or 3); from_state_dict reads it off the weight
    post_quant_conv: bool = True  # a 1×1 conv on the ±1 codes before the decoder (Show-o's decoder.post_quant_conv)
    in_channels: int = 3
    out_channels: int = 3
    norm_groups: int = 32
    norm_eps: float = 1e-6
    resolution: int = 256  # the image size the tokenizer is used at (image_size); encode takes any multiple of stride
    convert_to_rgb: bool = False  # whether image loading may convert L/RGBA/P images to RGB (else they are errors)

    def __post_init__(self) -> None:
        for name in ("encoder_ch_mult", "encoder_num_res_blocks", "decoder_ch_mult", "decoder_num_res_blocks"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        levels = len(self.encoder_ch_mult)
        lengths = {name: len(getattr(self, name)) for name in
                   ("encoder_num_res_blocks", "decoder_ch_mult", "decoder_num_res_blocks")}
        if levels < 1 or any(n != levels for n in lengths.values()):
            raise ValueError(
                f"MAGVITv2Config: encoder_ch_mult has {levels} levels; encoder_num_res_blocks, decoder_ch_mult and "
                f"decoder_num_res_blocks must have as many (encoder and decoder strides must match), got {lengths}"
            )
        if not 1 <= self.z_channels <= 62:
            raise ValueError(f"MAGVITv2Config: z_channels (LFQ bits) must lie in [1, 62], got {self.z_channels}")
        if self.conv_out_kernel not in (1, 3):
            raise ValueError(f"MAGVITv2Config: conv_out_kernel must be 1 or 3, got {self.conv_out_kernel}")
        widths = {self.ch * m for m in self.encoder_ch_mult + self.decoder_ch_mult}
        bad = sorted(w for w in widths if w % self.norm_groups)
        if bad:
            raise ValueError(f"MAGVITv2Config: every width ch·mult must be divisible by norm_groups="
                             f"{self.norm_groups}, got widths {bad}")
        if self.resolution % self.stride:
            raise ValueError(f"MAGVITv2Config: resolution={self.resolution} is not divisible by the stride "
                             f"{self.stride}")

    @property
    def stride(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)

    @property
    def num_codes(self) -> int:
        return 2**self.z_channels

    def to_dict(self) -> dict[str, Any]:
        return {"tokenizer_type": TOKENIZER_TYPE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "config") -> MAGVITv2Config:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields - {"tokenizer_type"})
        if unknown:
            raise ValueError(f"{where}: unknown MAGVITv2Config keys {unknown}; known: {sorted(fields)}")
        return cls(**{k: v for k, v in d.items() if k in fields})

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Tensor], **overrides: Any) -> MAGVITv2Config:
        """Sizes read off the tensors of a checkpoint in our layout (after ``map_magvit_keys``).

        ch = conv_in's output width; per level the res-block count and ch·mult from each level's last conv2;
        z_channels and conv_out_kernel from encoder.conv_out; mid blocks/attention and post_quant_conv by presence.
        resolution, norm_groups, norm_eps and convert_to_rgb are not in the tensors: defaults unless overridden.
        """
        sd = map_magvit_keys(state_dict)
        try:
            conv_in = sd["encoder.conv_in.weight"]  # (ch, in, 3, 3)
            conv_out = sd["encoder.conv_out.weight"]  # (C, width, k, k)
            dec_out = sd["decoder.conv_out.weight"]  # (out, width, 3, 3)
        except KeyError as exc:
            raise CheckpointError(f"MAGVITv2Config.from_state_dict: the checkpoint has no {exc.args[0]!r}; "
                             f"is it a MAGVIT-v2 checkpoint? First keys: {sorted(sd)[:8]}") from None
        ch = int(conv_in.shape[0])

        def levels(part: str, group: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
            pat = re.compile(rf"^{part}\.{group}\.(\d+)\.block\.(\d+)\.conv2\.weight$")
            blocks: dict[int, dict[int, Tensor]] = {}
            for k, v in sd.items():
                m = pat.match(k)
                if m:
                    blocks.setdefault(int(m[1]), {})[int(m[2])] = v
            if sorted(blocks) != list(range(len(blocks))) or not blocks:
                raise CheckpointError(f"MAGVITv2Config.from_state_dict: {part}.{group}.* levels are not 0..L−1: "
                                 f"{sorted(blocks)}")
            counts = tuple(len(blocks[i]) for i in range(len(blocks)))
            mult = tuple(int(blocks[i][max(blocks[i])].shape[0]) // ch for i in range(len(blocks)))
            return mult, counts

        enc_mult, enc_blocks = levels("encoder", "down")
        dec_mult, dec_blocks = levels("decoder", "up")
        mids = {int(m[1]) for k in sd if (m := re.match(r"^encoder\.mid\.block_(\d+)\.", k))}
        attn = {part: any(k.startswith(f"{part}.mid.attn_1.") for k in sd) for part in ("encoder", "decoder")}
        if attn["encoder"] != attn["decoder"]:
            only = "encoder" if attn["encoder"] else "decoder"
            raise CheckpointError(f"MAGVITv2Config.from_state_dict: mid.attn_1 only in the {only}; this tokenizer has "
                                  f"mid attention in both the encoder and the decoder (Show-o's) or in neither")
        found: dict[str, Any] = dict(
            ch=ch, in_channels=int(conv_in.shape[1]), encoder_ch_mult=enc_mult, encoder_num_res_blocks=enc_blocks,
            decoder_ch_mult=dec_mult, decoder_num_res_blocks=dec_blocks, num_mid_blocks=len(mids),
            mid_attention=attn["encoder"], z_channels=int(conv_out.shape[0]),
            conv_out_kernel=int(conv_out.shape[-1]), post_quant_conv="post_quant_conv.weight" in sd,
            out_channels=int(dec_out.shape[0]),
        )
        found.update(overrides)
        return cls(**found)


# ---------------------------------------------------------------------------------------------------------------------
# Modules (their attribute names are the checkpoint keys)
# ---------------------------------------------------------------------------------------------------------------------


def _norm(cfg: MAGVITv2Config, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps, affine=True)


class ResBlock(nn.Module):
    """x + conv2(swish(norm2(conv1(swish(norm1(x)))))), a 1×1 ``nin_shortcut`` on x where the width changes."""

    def __init__(self, cfg: MAGVITv2Config, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1 = _norm(cfg, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(cfg, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:  # (B, c_in, h, w) -> (B, c_out, h, w)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h·w positions (VQGAN's mid.attn_1), 1×1 convs for q, k, v, proj_out."""

    def __init__(self, cfg: MAGVITv2Config, c: int) -> None:
        super().__init__()
        self.norm = _norm(cfg, c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:  # (B, c, h, w)
        B, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v))  # (B, 1, hw, c)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, 1, hw, c), scale c^−½
        return x + self.proj_out(a.squeeze(1).transpose(1, 2).reshape(B, c, h, w))


class Downsample(nn.Module):
    """Pad right/bottom by one, then a 3×3 stride-2 conv: (B, c, H, W) -> (B, c, H/2, W/2)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv: (B, c, h, w) -> (B, c, 2h, 2w)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    """block_1, [attn_1], block_2, … block_n at one width."""

    def __init__(self, cfg: MAGVITv2Config, c: int) -> None:
        super().__init__()
        self.names = []
        for k in range(1, cfg.num_mid_blocks + 1):
            setattr(self, f"block_{k}", ResBlock(cfg, c, c))
            self.names.append(f"block_{k}")
            if k == 1 and cfg.mid_attention:
                self.attn_1 = AttnBlock(cfg, c)
                self.names.append("attn_1")

    def forward(self, x: Tensor) -> Tensor:
        for name in self.names:
            x = getattr(self, name)(x)
        return x


class Level(nn.Module):
    """One resolution: ``block`` (res-blocks), then ``downsample`` (encoder) or ``upsample`` (decoder) if any."""

    def __init__(self, cfg: MAGVITv2Config, c_in: int, c_out: int, n_blocks: int, resample: str | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResBlock(cfg, c_in if j == 0 else c_out, c_out) for j in range(n_blocks))
        if resample == "down":
            self.downsample = Downsample(c_out)
        elif resample == "up":
            self.upsample = Upsample(c_out)

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.block:
            x = blk(x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, C, H/stride, W/stride), before quant_conv."""

    def __init__(self, cfg: MAGVITv2Config) -> None:
        super().__init__()
        L = len(cfg.encoder_ch_mult)
        widths = [cfg.ch * m for m in cfg.encoder_ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        c, levels = cfg.ch, []
        for i in range(L):
            n_blocks = cfg.encoder_num_res_blocks[i]
            c_out = widths[i] if n_blocks else c
            levels.append(Level(cfg, c, c_out, n_blocks, "down" if i < L - 1 else None))
            c = c_out
        self.down = nn.ModuleList(levels)
        self.mid = Mid(cfg, c)
        self.norm_out = _norm(cfg, c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, cfg.conv_out_kernel, padding=cfg.conv_out_kernel // 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)
        h = self.mid(h)  # (B, ch·mult[−1], h, w)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C, h, w)


class Decoder(nn.Module):
    """(B, C, h, w) -> (B, 3, h·stride, w·stride), unclamped."""

    def __init__(self, cfg: MAGVITv2Config) -> None:
        super().__init__()
        L = len(cfg.decoder_ch_mult)
        c = cfg.ch * cfg.decoder_ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = Mid(cfg, c)
        levels: list[Level] = []
        for i in reversed(range(L)):
            n_blocks = cfg.decoder_num_res_blocks[i]
            c_out = cfg.ch * cfg.decoder_ch_mult[i] if n_blocks else c
            levels.insert(0, Level(cfg, c, c_out, n_blocks, "up" if i > 0 else None))
            c = c_out
        self.up = nn.ModuleList(levels)  # up[i] = level i from the finest; runs coarsest first
        self.norm_out = _norm(cfg, c)
        self.conv_out = nn.Conv2d(c, cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch·mult[−1], h, w)
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W)


# ---------------------------------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------------------------------


class MAGVITv2(nn.Module):
    """Frozen MAGVIT-v2 image tokenizer: ``encode`` images → (B, h·w) int64 codes, ``decode`` codes → images."""

    def __init__(self, config: MAGVITv2Config | None = None) -> None:
        super().__init__()
        self.config = config = config or MAGVITv2Config()
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)
        if config.post_quant_conv:
            self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)
        self.decoder = Decoder(config)
        self.requires_grad_(False)
        self.eval()

    # --- the ImageTokenizer protocol (model/tokenizer_vq.py) ---------------------------------------------------------

    @property
    def num_codes(self) -> int:
        return self.config.num_codes

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.config.resolution, self.config.resolution)

    @property
    def grid(self) -> tuple[int, int]:
        s = self.config.resolution // self.config.stride
        return (s, s)

    @property
    def convert_to_rgb(self) -> bool:
        return self.config.convert_to_rgb

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    def encode_latents(self, images: Tensor) -> Tensor:
        """Pre-quantisation latents: images (B, 3, H, W) in [−1, 1] -> z (B, C, H/stride, W/stride)."""
        self._check_images(images)
        dtype = self.quant_conv.weight.dtype
        return self.quant_conv(self.encoder(images.to(device=self.device, dtype=dtype)))

    @torch.inference_mode()
    def encode(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) float in [−1, 1], H and W multiples of the stride -> codes (B, h·w) int64 in
        [0, 2^C), row-major over (h, w)."""
        z = self.encode_latents(images)  # (B, C, h, w)
        return lfq_quantize(z.permute(0, 2, 3, 1)).flatten(1)  # (B, h·w)

    @torch.inference_mode()
    def decode(self, codes: Tensor, shape: Sequence[int] | None = None) -> Tensor:
        """codes (B, N) integer in [0, 2^C) -> images (B, 3, h·stride, w·stride) float in [−1, 1].

        ``shape`` = (h, w) of the code grid, h·w = N; by default h = w = √N (N must then be a square).
        """
        B, h, w = check_code_grid(codes, shape, "MAGVITv2.decode")
        q = lfq_codes(codes.to(self.device), self.config.z_channels, self.quant_conv.weight.dtype)  # (B, N, C)
        q = q.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous()  # (B, C, h, w)
        if self.config.post_quant_conv:
            q = self.post_quant_conv(q)
        return self.decoder(q).clamp(-1.0, 1.0)

    @staticmethod
    def to_uint8(images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [−1, 1] -> (B, H, W, 3) uint8 on the CPU (``images_to_uint8``)."""
        return images_to_uint8(images, "MAGVITv2.to_uint8")

    # --- checkpoints --------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: MAGVITv2Config | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> MAGVITv2:
        """Load from a local folder (our config.json + model.safetensors, or a release's ``pytorch_model.bin`` /
        ``*.safetensors``) or a single weights file. Sizes: ``config`` if given, else our config.json, else read off
        the tensors (``MAGVITv2Config.from_state_dict``). Nothing is downloaded."""
        path = Path(path)
        files: dict[str, Path] = {}
        raw = read_state_dict(path, files)
        check_finite({k: v for k, v in raw.items() if not map_key(k).startswith(IGNORED_PREFIXES)}, files)
        sd = map_magvit_keys(raw, str(path))
        if config is None:
            saved = read_magvit_config(path)
            if saved is None:
                config = MAGVITv2Config.from_state_dict(sd)
            else:  # what our config.json names it says; a size it does not name is read off the tensors
                unnamed = [k for k in _READ_OFF_TENSORS if k not in saved]
                if unnamed:
                    found = MAGVITv2Config.from_state_dict(sd)
                    saved = {**saved, **{k: getattr(found, k) for k in unnamed}}
                config = MAGVITv2Config.from_dict(saved, str(path / CONFIG_FILE))
        model = cls(config)
        check_lfq_buffers(raw, config.z_channels, source=str(path))  # sd no longer holds them
        load_magvit_state_dict(model, sd, source=str(path))
        return model.to(device=device, dtype=dtype)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """config.json (``tokenizer_type: magvitv2`` + the config) and model.safetensors in the released key layout."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        sd = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(sd, str(path / WEIGHTS_FILE), metadata={"format": "pt", "tokenizer_type": TOKENIZER_TYPE})

    # --- checks -------------------------------------------------------------------------------------------------------

    def _check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.dtype not in _FLOAT_DTYPES:
            got = f"dtype={images.dtype}" if isinstance(images, Tensor) else f"type {type(images).__name__}"
            raise ValueError(f"MAGVITv2.encode: images must be a float tensor in [−1, 1] (uint8 images go through "
                             f"tokenizer_vq.image_to_tensor first), got {got}")
        shape = tuple(images.shape)
        cin, s = self.config.in_channels, self.config.stride
        if images.dim() != 4 or shape[1] != cin:
            raise ValueError(f"MAGVITv2.encode: images must be (B, {cin}, H, W), got shape {shape}")
        if shape[2] % s or shape[3] % s or shape[2] == 0 or shape[3] == 0:
            raise ValueError(f"MAGVITv2.encode: images' H and W must be positive multiples of the stride {s}, "
                             f"got shape {shape}")
        if images.numel():
            lo, hi = torch.aminmax(images.detach())
            if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
                raise ValueError(f"MAGVITv2.encode: images must lie in [−1, 1], got min={float(lo):.4g} "
                                 f"max={float(hi):.4g} in images of shape {shape}")


def check_code_grid(codes: Tensor, shape: Sequence[int] | None, where: str) -> tuple[int, int, int]:
    """Checks codes (B, N) integer and returns (B, h, w); shared with tokenizer_vq."""
    if not isinstance(codes, Tensor) or codes.dtype.is_floating_point or codes.dtype.is_complex \
            or codes.dtype == torch.bool or codes.dim() != 2:
        got = f"dtype={codes.dtype} shape={tuple(codes.shape)}" if isinstance(codes, Tensor) else type(codes).__name__
        raise ValueError(f"{where}: codes must be an integer tensor (B, N), got {got}")
    B, N = codes.shape
    if shape is None:
        h = math.isqrt(N)
        if h * h != N or N == 0:
            raise ValueError(f"{where}: codes (B, N) = {tuple(codes.shape)} has N = {N}, not a square; pass "
                             f"shape=(h, w) with h·w = N")
        return B, h, h
    h, w = (int(v) for v in shape)
    if h * w != N or h <= 0:
        raise ValueError(f"{where}: shape={tuple(shape)} has h·w = {h * w}, codes (B, N) = {tuple(codes.shape)}")
    return B, h, w


def images_to_uint8(images: Tensor, name: str = "images_to_uint8") -> Tensor:
    """Any image tokenizer's decode, (B, 3, H, W) in [−1, 1] -> (B, H, W, 3) uint8 on the CPU, round((x + 1)/2 · 255).

    Show-o truncates (``astype(uint8)``) instead of rounding: values differ by at most one level. ``name`` starts the
    error message."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name}: images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu()
