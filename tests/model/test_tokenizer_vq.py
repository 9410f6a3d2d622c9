"""Patch VQ tokenizer: k-means fit, nearest-code encode, save/load, image loading errors, load_image_tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hermesflow_fast.model.magvit import MAGVITv2, MAGVITv2Config
from hermesflow_fast.model.tokenizer_vq import (
    ImageTokenizer,
    PatchVQTokenizer,
    image_to_tensor,
    load_image,
    load_image_tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py



def shapes(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """n procedural images (n, 3, S, S) in [−1, 1]: a coloured rectangle or disc on a coloured background."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        bg, fg = torch.rand(3, generator=g) * 2 - 1, torch.rand(3, generator=g) * 2 - 1
        cy, cx = torch.randint(size // 4, size - size // 4, (2,), generator=g).tolist()
        r = int(torch.randint(max(1, size // 8), max(2, size // 3), (1,), generator=g))
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) if i % 2 else ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
        out[i] = torch.where(mask, fg[:, None, None], bg[:, None, None])
    return out


def _mse(tok: PatchVQTokenizer, images: torch.Tensor) -> float:
    return float(((tok.decode(tok.encode(images)) - images) ** 2).mean())


def test_kmeans_fit_beats_its_initial_codebook_and_is_seeded():
    images = shapes(48)
    init = PatchVQTokenizer.fit(images, num_codes=64, seed=0, iters=0)
    fitted = PatchVQTokenizer.fit(images, num_codes=64, seed=0, iters=8)
    assert _mse(fitted, images) < 0.9 * _mse(init, images)
    assert fitted.fit_history[-1] <= fitted.fit_history[0]
    again = PatchVQTokenizer.fit(images, num_codes=64, seed=0, iters=8)
    assert torch.equal(again.codebook, fitted.codebook)
    assert fitted.grid == (8, 8) and fitted.image_size == (32, 32) and fitted.num_codes == 64
    codes = fitted.encode(images)
    assert codes.shape == (48, 64) and codes.dtype == torch.int64
    assert isinstance(fitted, ImageTokenizer)


def test_encode_is_the_brute_force_nearest_code():
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    tok = PatchVQTokenizer.fit(shapes(8, 16), num_codes=32, seed=1, iters=3)
    codes = tok.encode(images)  # (4, 16)
    x = tok.patchify(images).reshape(-1, 48)
    d = torch.cdist(x.double(), tok.codebook.double()) ** 2  # (64, 32)
    chosen = d.gather(1, codes.reshape(-1, 1)).squeeze(1)
    assert torch.all(chosen <= d.min(1).values + 1e-9)
    separated = (d.sort(1).values[:, 1] - d.min(1).values) > 1e-4
    assert torch.equal(codes.reshape(-1)[separated], d.argmin(1)[separated])
    recon = tok.decode(codes)
    assert torch.equal(tok.patchify(recon), tok.codebook[codes])


def test_save_load_round_trip(tmp_path):
    tok = PatchVQTokenizer.fit(shapes(8, 16), num_codes=16, seed=3, iters=2, patch_size=2)
    tok.save_pretrained(tmp_path / "vq")
    back = load_image_tokenizer(tmp_path / "vq")
    assert isinstance(back, PatchVQTokenizer) and back.config == tok.config
    assert torch.equal(back.codebook, tok.codebook)
    images = shapes(3, 16, seed=9)
    assert torch.equal(back.encode(images), tok.encode(images))
    assert torch.equal(back.decode(tok.encode(images)), tok.decode(tok.encode(images)))


def test_load_image_tokenizer_reads_magvit(tmp_path):
    cfg = MAGVITv2Config(ch=8, encoder_ch_mult=(1, 2), encoder_num_res_blocks=(1, 1), decoder_ch_mult=(1, 2),
                         decoder_num_res_blocks=(1, 1), norm_groups=4, resolution=8)
    MAGVITv2(cfg).save_pretrained(tmp_path / "mv")
    tok = load_image_tokenizer(tmp_path / "mv")
    assert isinstance(tok, MAGVITv2) and tok.config == cfg and tok.grid == (4, 4)
    assert isinstance(tok, ImageTokenizer)


def test_image_loading_checks_size_and_mode(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x = image_to_tensor(rgb, 32)
    assert x.shape == (3, 32, 32) and float(x.min()) >= -1 and float(x.max()) <= 1
    assert torch.allclose(x, torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1, atol=1e-6)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    assert torch.equal(load_image(tmp_path / "a.png", 32), x)
    with pytest.raises(ValueError, match=r"a\.png: image is 32×32 \(W×H\), the tokenizer takes 16×16"):
        load_image(tmp_path / "a.png", 16)
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "b.png")
    with pytest.raises(ValueError, match=r"b\.png: image mode is RGBA, not RGB.*convert_to_rgb=false"):
        load_image(tmp_path / "b.png", 32)
    assert torch.equal(load_image(tmp_path / "b.png", 32, convert_to_rgb=True), x)
    with pytest.raises(ValueError, match=r"mode is L, not RGB"):
        image_to_tensor(rgb[..., 0], 32)
    assert image_to_tensor(rgb[..., 0], 32, convert_to_rgb=True).shape == (3, 32, 32)
    with pytest.raises(ValueError, match=r"uint8.*float32"):
        image_to_tensor(rgb.astype(np.float32), 32)
    (tmp_path / "c.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"c\.png: cannot read the image"):
        load_image(tmp_path / "c.png", 32)
    (tmp_path / "d.png").write_bytes((tmp_path / "a.png").read_bytes()[:200])
    with pytest.raises(ValueError, match=r"d\.png: cannot (read|decode) the image"):
        load_image(tmp_path / "d.png", 32)


def test_bad_tensors_and_codes_are_errors():
    tok = PatchVQTokenizer.fit(shapes(4, 16), num_codes=8, seed=0, iters=1)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got shape \(1, 1, 16, 16\)"):
        tok.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"multiples of patch_size 4, got shape \(1, 3, 15, 16\)"):
        tok.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"float tensor.*torch\.uint8"):
        tok.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 8\), got min=0 max=8"):
        tok.decode(torch.tensor([[0, 8, 1, 2]]))
    with pytest.raises(ValueError, match="fewer than num_codes"):
        PatchVQTokenizer.fit(shapes(1, 8), num_codes=8)


def test_empty_codes_are_reseeded_with_the_worst_served_patches():
    from hermesflow_fast.model.tokenizer_vq import _lloyd_update

    x = torch.tensor([[0.0, 0.0], [0.2, 0.0], [5.0, 5.0], [1.0, 1.0]])
    assign = torch.tensor([0, 0, 0, 1])  # code 2 is empty
    err = torch.tensor([0.0, 0.04, 50.0, 0.0])
    cb = _lloyd_update(x, assign, err, 3)
    assert torch.allclose(cb[0], x[:3].mean(0)) and torch.equal(cb[1], x[3]) and torch.equal(cb[2], x[2])
