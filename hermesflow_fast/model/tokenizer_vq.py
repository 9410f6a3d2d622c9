"""A codebook VQ tokenizer for small images, the image-tokenizer protocol it shares with MAGVIT-v2, and image loading.

Patch VQ (``PatchVQTokenizer``): an image (3, S, S) in [−1, 1] is cut into non-overlapping p×p patches on a
g×g grid (g = S/p), each flattened in (channel, row, column) order to x ∈ R^D, D = 3p². The projection is the
identity on that flattened patch: with it, squared distance in code space IS the patch's pixel squared error, so

    encode:  code(x) = argmin_k ||x − c_k||²             (ops.nearest_code; the lowest k on ties)
    decode:  x̂ = c_code                                  (the k-means centroid = the mean patch of its cluster)

and the nearest code is exactly the code with the lowest reconstruction error of this decoder (a PCA projection
would only rotate or truncate that space). Codes are flattened row-major over the (g, g) grid, as MAGVIT's.

Codebook fit (``PatchVQTokenizer.fit``): k-means on the patches of the given images. k-means++ seeding from a
seeded ``torch.Generator`` (first centre uniform, then each next one drawn ∝ D(x)², the squared distance to the
nearest chosen centre), then Lloyd iterations: assign every patch to its nearest code, move each code to the mean of
its patches; a code left with no patch is re-seeded with the patches farthest from their codes (largest error first).
Stops after ``iters`` iterations or when no assignment changes. Same images + seed → the same codebook.

Shared API (``ImageTokenizer``): ``encode(images (B, 3, H, W) in [−1, 1]) -> (B, N) int64``, ``decode(codes, shape)``,
``num_codes``, ``grid`` (h, w), ``image_size`` (H, W), ``convert_to_rgb``, ``device``, ``save_pretrained(dir)``.
``load_image_tokenizer(path)`` picks the class from config.json's ``tokenizer_type`` (``patch_vq`` / ``magvitv2``;
a folder of weights without our config is read as a MAGVIT-v2 release).

Image loading (``image_to_tensor``, ``load_image``): PIL image or uint8 array (H, W, 3) → (3, H, W) float32,
(x/255 − 0.5)/0.5 as Show-o's transform. No resizing: a size other than the tokenizer's is an error naming the file
and both sizes. A mode other than RGB is an error unless ``convert_to_rgb`` (a config field) allows converting it
(``Image.convert("RGB")``: L and P expand, the alpha of LA/RGBA is dropped, as Show-o's loader does); 16-bit and float
modes (I, I;16, F) are always errors, since converting them clips.

    python -m pytest -q tests/model/test_tokenizer_vq.py
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from hermesflow_fast.model.magvit import TOKENIZER_TYPE as MAGVIT_TYPE
from hermesflow_fast.model.magvit import MAGVITv2, check_code_grid, images_to_uint8
from hermesflow_fast.model.weights import CheckpointError, check_finite, load_state_dict_file, read_json_object
from hermesflow_fast.ops import nearest_code

__all__ = [
    "CONVERTIBLE_MODES",
    "TOKENIZER_TYPE",
    "ImageTokenizer",
    "PatchVQConfig",
    "PatchVQTokenizer",
    "image_to_tensor",
    "images_to_uint8",
    "load_image",
    "load_image_tokenizer",
]

TOKENIZER_TYPE = "patch_vq"
_CONFIG_FILE = "config.json"
_WEIGHTS_FILE = "model.safetensors"
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
CONVERTIBLE_MODES = ("L", "LA", "RGBA", "RGBX", "P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV")


# ---------------------------------------------------------------------------------------------------------------------
# The protocol every image tokenizer meets
# ---------------------------------------------------------------------------------------------------------------------


@runtime_checkable
class ImageTokenizer(Protocol):
    """What the token cache and the trainer need of an image tokenizer (MAGVITv2 and PatchVQTokenizer meet it)."""

    @property
    def num_codes(self) -> int: ...  # codes lie in [0, num_codes)

    @property
    def grid(self) -> tuple[int, int]: ...  # (h, w) of the code grid at image_size; N = h·w

    @property
    def image_size(self) -> tuple[int, int]: ...  # (H, W) of the images it is used at

    @property
    def convert_to_rgb(self) -> bool: ...  # whether loading may convert non-RGB images

    @property
    def device(self) -> torch.device: ...

    def encode(self, images: Tensor) -> Tensor: ...  # (B, 3, H, W) float in [−1, 1] -> (B, N) int64

    def decode(self, codes: Tensor, shape: Sequence[int] | None = None) -> Tensor: ...  # (B, N) -> (B, 3, H, W)

    def save_pretrained(self, path: str | os.PathLike) -> None: ...


def load_image_tokenizer(path: str | os.PathLike, device: str | torch.device = "cpu") -> ImageTokenizer:
    """The tokenizer saved at ``path`` (local only): config.json's ``tokenizer_type`` picks the class; a weights file,
    or a folder of weights whose config.json is not ours (e.g. a ``showlab/magvitv2`` download), is MAGVIT-v2.
    A missing path, an unknown type or unreadable weights are a ``CheckpointError`` naming the file."""
    path = Path(path)
    config = path / _CONFIG_FILE
    kind = None
    if path.is_dir() and config.is_file():
        kind = read_json_object(config).get("tokenizer_type")
    if kind == TOKENIZER_TYPE:
        return PatchVQTokenizer.from_pretrained(path).to(device)
    if kind in (MAGVIT_TYPE, None) and path.exists():
        return MAGVITv2.from_pretrained(path, device=device)
    if not path.exists():
        raise CheckpointError(f"load_image_tokenizer: {path} does not exist (tokenizers are read from a local path)")
    raise CheckpointError(f"{config}: unknown tokenizer_type {kind!r}; known: {TOKENIZER_TYPE!r}, {MAGVIT_TYPE!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Patch VQ
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchVQConfig:
    image_size: int = 32  # S: images are S×S
    patch_size: int = 4  # p: a (S/p)×(S/p) grid of codes
    num_codes: int = 256  # K
    channels: int = 3
    convert_to_rgb: bool = False

    def __post_init__(self) -> None:
        if self.patch_size < 1 or self.image_size < 1 or self.image_size % self.patch_size:
            raise ValueError(f"PatchVQConfig: image_size={self.image_size} must be a positive multiple of "
                             f"patch_size={self.patch_size}")
        if self.num_codes < 1 or self.channels < 1:
            raise ValueError(f"PatchVQConfig: num_codes={self.num_codes} and channels={self.channels} must be ≥ 1")

    @property
    def dim(self) -> int:
        return self.channels * self.patch_size**2

    def to_dict(self) -> dict[str, Any]:
        return {"tokenizer_type": TOKENIZER_TYPE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "config") -> PatchVQConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields - {"tokenizer_type"})
        if unknown:
            raise ValueError(f"{where}: unknown PatchVQConfig keys {unknown}; known: {sorted(fields)}")
        return cls(**{k: v for k, v in d.items() if k in fields})


class PatchVQTokenizer(nn.Module):
    """p×p patches → the nearest of K codebook patches; decode = those codebook patches tiled back."""

    def __init__(self, config: PatchVQConfig, codebook: Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        if codebook is None:
            codebook = torch.zeros(config.num_codes, config.dim)
        if tuple(codebook.shape) != (config.num_codes, config.dim) or not codebook.dtype.is_floating_point:
            raise ValueError(f"PatchVQTokenizer: codebook must be float (num_codes, 3·p²) = "
                             f"{(config.num_codes, config.dim)}, got dtype={codebook.dtype} "
                             f"shape={tuple(codebook.shape)}")
        self.register_buffer("codebook", codebook.detach().float().clone())  # (K, D)
        self.fit_history: list[float] = []  # mean squared error per pixel after each assignment of fit()

    # --- the ImageTokenizer protocol ----------------------------------------------------------------------------------

    @property
    def num_codes(self) -> int:
        return self.config.num_codes

    @property
    def grid(self) -> tuple[int, int]:
        g = self.config.image_size // self.config.patch_size
        return (g, g)

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.config.image_size, self.config.image_size)

    @property
    def convert_to_rgb(self) -> bool:
        return self.config.convert_to_rgb

    @property
    def device(self) -> torch.device:
        return self.codebook.device

    @torch.inference_mode()
    def encode(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) float in [−1, 1], H and W multiples of p -> codes (B, (H/p)·(W/p)) int64."""
        x = self.patchify(images.to(self.device))  # (B, N, D)
        B, N, D = x.shape
        return nearest_code(x.reshape(B * N, D).to(self.codebook.dtype), self.codebook).reshape(B, N)

    @torch.inference_mode()
    def decode(self, codes: Tensor, shape: Sequence[int] | None = None) -> Tensor:
        """codes (B, N) integer in [0, K) -> images (B, 3, h·p, w·p) in [−1, 1]; (h, w) = shape or (√N, √N)."""
        B, h, w = check_code_grid(codes, shape, "PatchVQTokenizer.decode")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codes):
            raise ValueError(f"PatchVQTokenizer.decode: codes must lie in [0, {self.num_codes}), got min="
                             f"{int(codes.min())} max={int(codes.max())} in codes of shape {tuple(codes.shape)}")
        patches = self.codebook[codes.to(self.device).long()]  # (B, N, D)
        return self.unpatchify(patches, h, w).clamp(-1.0, 1.0)

    # --- patches ------------------------------------------------------------------------------------------------------

    def patchify(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, (H/p)·(W/p), C·p·p), each patch flattened (channel, row, column), row-major grid."""
        self._check_images(images)
        B, C, H, W = images.shape
        p = self.config.patch_size
        x = images.float().reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
        return x.reshape(B, (H // p) * (W // p), C * p * p)

    def unpatchify(self, patches: Tensor, h: int, w: int) -> Tensor:
        """(B, h·w, C·p·p) -> (B, C, h·p, w·p), the inverse of patchify."""
        B = patches.shape[0]
        C, p = self.config.channels, self.config.patch_size
        x = patches.reshape(B, h, w, C, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, h, p, w, p)
        return x.reshape(B, C, h * p, w * p)

    def _check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.dtype not in _FLOAT_DTYPES:
            got = f"dtype={images.dtype}" if isinstance(images, Tensor) else f"type {type(images).__name__}"
            raise ValueError(f"PatchVQTokenizer: images must be a float tensor in [−1, 1] (uint8 images go through "
                             f"image_to_tensor first), got {got}")
        shape, C, p = tuple(images.shape), self.config.channels, self.config.patch_size
        if images.dim() != 4 or shape[1] != C:
            raise ValueError(f"PatchVQTokenizer: images must be (B, {C}, H, W), got shape {shape}")
        if shape[2] % p or shape[3] % p or shape[2] == 0 or shape[3] == 0:
            raise ValueError(f"PatchVQTokenizer: images' H and W must be positive multiples of patch_size {p}, "
                             f"got shape {shape}")
        if images.numel():
            lo, hi = torch.aminmax(images.detach())
            if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
                raise ValueError(f"PatchVQTokenizer: images must lie in [−1, 1], got min={float(lo):.4g} "
                                 f"max={float(hi):.4g} in images of shape {shape}")

    # --- fitting ------------------------------------------------------------------------------------------------------

    @classmethod
    def fit(cls, images: Tensor, num_codes: int, seed: int = 0, iters: int = 10, patch_size: int = 4,
            convert_to_rgb: bool = False) -> PatchVQTokenizer:
        """k-means codebook on the patches of ``images`` (B, 3, S, S) in [−1, 1]; ``iters=0`` keeps the k-means++
        seeding (the initial codebook). ``fit_history`` holds the per-pixel MSE after each assignment."""
        if images.dim() != 4 or images.shape[2] != images.shape[3]:
            raise ValueError(f"PatchVQTokenizer.fit: images must be square (B, C, S, S), got shape "
                             f"{tuple(images.shape)}")
        config = PatchVQConfig(image_size=int(images.shape[2]), patch_size=patch_size, num_codes=num_codes,
                               channels=int(images.shape[1]), convert_to_rgb=convert_to_rgb)
        model = cls(config)
        x = model.patchify(images).reshape(-1, config.dim).contiguous()  # (M, D)
        if x.shape[0] < num_codes:
            raise ValueError(f"PatchVQTokenizer.fit: {x.shape[0]} patches from images of shape "
                             f"{tuple(images.shape)} are fewer than num_codes={num_codes}")
        gen = torch.Generator(device="cpu").manual_seed(seed)
        codebook = _kmeans_plus_plus(x, num_codes, gen)  # (K, D)
        history: list[float] = []
        assign = None
        for _ in range(iters):
            new_assign = nearest_code(x, codebook)  # (M,)
            err = ((x - codebook[new_assign]) ** 2).sum(1)  # (M,)
            history.append(float(err.mean()) / config.dim)
            if assign is not None and torch.equal(new_assign, assign):
                break
            assign = new_assign
            codebook = _lloyd_update(x, assign, err, num_codes)
        final = nearest_code(x, codebook)
        history.append(float(((x - codebook[final]) ** 2).mean()))
        model.codebook.copy_(codebook)
        model.fit_history = history
        return model

    # --- checkpoints --------------------------------------------------------------------------------------------------

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """``config.json`` (tokenizer_type patch_vq + config) and ``model.safetensors`` (``codebook`` (K, D))."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / _CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        save_file({"codebook": self.codebook.detach().cpu().contiguous()}, str(path / _WEIGHTS_FILE),
                  metadata={"format": "pt", "tokenizer_type": TOKENIZER_TYPE})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> PatchVQTokenizer:
        """A folder written by ``save_pretrained``; every problem is a ``CheckpointError`` naming the file."""
        path = Path(path)
        cfg_file, weights = path / _CONFIG_FILE, path / _WEIGHTS_FILE
        if not cfg_file.is_file() or not weights.is_file():
            raise CheckpointError(f"PatchVQTokenizer.from_pretrained: {path} needs {_CONFIG_FILE} and "
                                  f"{_WEIGHTS_FILE}")
        d = read_json_object(cfg_file)
        if d.get("tokenizer_type") != TOKENIZER_TYPE:
            raise CheckpointError(f"{cfg_file}: tokenizer_type is {d.get('tokenizer_type')!r}, not "
                                  f"{TOKENIZER_TYPE!r}")
        try:
            config = PatchVQConfig.from_dict(d, str(cfg_file))
        except (TypeError, ValueError) as exc:
            msg = str(exc)
            raise CheckpointError(msg if msg.startswith(str(cfg_file)) else f"{cfg_file}: {msg}") from exc
        sd = load_state_dict_file(weights)
        if set(sd) != {"codebook"}:
            raise CheckpointError(f"{weights}: expected exactly the tensor 'codebook', got {sorted(sd)}")
        cb = sd["codebook"]
        if tuple(cb.shape) != (config.num_codes, config.dim):
            raise CheckpointError(f"{weights}: codebook has shape {tuple(cb.shape)}, config {cfg_file.name} expects "
                                  f"(num_codes, channels·p²) = {(config.num_codes, config.dim)}")
        check_finite(sd, weights)
        return cls(config, cb)




def _kmeans_plus_plus(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding: x (M, D) -> (k, D); each next centre drawn ∝ squared distance to the nearest chosen one."""
    M = x.shape[0]
    idx = [int(torch.randint(M, (1,), generator=gen))]
    d2 = ((x - x[idx[0]]) ** 2).sum(1)  # (M,)
    for _ in range(1, k):
        cdf = torch.cumsum(d2.double(), 0)  # (M,)
        total = float(cdf[-1])
        if total <= 0.0:  # fewer distinct patches than codes: duplicate a random one
            j = int(torch.randint(M, (1,), generator=gen))
        else:
            u = torch.rand(1, generator=gen, dtype=torch.float64) * total
            j = min(int(torch.searchsorted(cdf, u, right=True)), M - 1)
        idx.append(j)
        d2 = torch.minimum(d2, ((x - x[j]) ** 2).sum(1))
    return x[torch.tensor(idx)].clone()


def _lloyd_update(x: Tensor, assign: Tensor, err: Tensor, k: int) -> Tensor:
    """Means of the assigned patches (M, D) → (k, D); empty codes take the patches with the largest errors."""
    D = x.shape[1]
    sums = torch.zeros(k, D, dtype=torch.float64).index_add_(0, assign, x.double())  # (k, D)
    counts = torch.bincount(assign, minlength=k)  # (k,)
    codebook = (sums / counts.clamp(min=1).unsqueeze(1).double()).to(x.dtype)
    empty = (counts == 0).nonzero().flatten()
    if empty.numel():
        far = torch.topk(err, empty.numel()).indices  # the worst-served patches, largest error first
        codebook[empty] = x[far]
    return codebook


# ---------------------------------------------------------------------------------------------------------------------
# Image loading
# ---------------------------------------------------------------------------------------------------------------------


def _size_hw(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    h, w = image_size
    return (int(h), int(w))


def image_to_tensor(image: Image.Image | np.ndarray, image_size: int | Sequence[int] | None = None,
                    convert_to_rgb: bool = False, name: str = "image") -> Tensor:
    """PIL image or uint8 array (H, W, 3) → (3, H, W) float32 in [−1, 1], as (x/255 − 0.5)/0.5.

    ``image_size`` (H, W) or S, if given, must match exactly (no resizing). Non-RGB images (PIL modes L, LA, RGBA,
    P, …; arrays (H, W), (H, W, 1), (H, W, 4)) are converted only with ``convert_to_rgb``. ``name`` (e.g. the file
    path) starts every error message. Raises ValueError.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"{name}: arrays must be uint8 (H, W, 3), got dtype={image.dtype} shape={image.shape}")
        arr = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
        if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
            raise ValueError(f"{name}: arrays must be (H, W, 3) RGB (or (H, W) / (H, W, 4) with convert_to_rgb), "
                             f"got shape {image.shape}")
        image = Image.fromarray(np.ascontiguousarray(arr))
    if not isinstance(image, Image.Image):
        raise ValueError(f"{name}: expected a PIL image or a uint8 numpy array, got {type(image).__name__}")
    want = _size_hw(image_size)
    W, H = image.size
    if want is not None and (H, W) != want:
        raise ValueError(f"{name}: image is {W}×{H} (W×H), the tokenizer takes {want[1]}×{want[0]}; resize and crop "
                         f"the images first (no resizing is done here)")
    if image.mode != "RGB":
        if not convert_to_rgb or image.mode not in CONVERTIBLE_MODES:
            why = ("the tokenizer config does not allow converting it (convert_to_rgb=false)" if not convert_to_rgb
                   else f"only {', '.join(CONVERTIBLE_MODES)} are converted")
            raise ValueError(f"{name}: image mode is {image.mode}, not RGB, and {why}")
        image = image.convert("RGB")
    arr = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()  # (3, H, W)
    return x.div_(255.0).sub_(0.5).div_(0.5)


def load_image(path: str | os.PathLike, image_size: int | Sequence[int] | None = None,
               convert_to_rgb: bool = False) -> Tensor:
    """Read an image file → (3, H, W) float32 in [−1, 1] (see image_to_tensor). Any failure — missing, unreadable,
    truncated or corrupt file, wrong size or mode — raises ValueError whose message starts with the path."""
    path = Path(path)
    try:
        im = Image.open(path)
    except Exception as exc:  # FileNotFoundError, UnidentifiedImageError, DecompressionBombError, …
        raise ValueError(f"{path}: cannot read the image ({type(exc).__name__}: {exc})") from exc
    try:
        try:
            im.load()
        except Exception as exc:  # OSError (truncated), SyntaxError, ValueError, … from a corrupt file
            raise ValueError(f"{path}: cannot decode the image ({type(exc).__name__}: {exc})") from exc
        return image_to_tensor(im, image_size, convert_to_rgb, name=str(path))
    finally:
        im.close()
