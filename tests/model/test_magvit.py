"""MAGVIT-v2 tokenizer: shapes, LFQ codes, the released key layout (.bin and safetensors), refusals."""

from __future__ import annotations

import pathlib

import pytest
import torch
from safetensors.torch import save_file

from hermesflow_fast.model.magvit import MAGVITv2, MAGVITv2Config, load_magvit_state_dict, map_magvit_keys

TINY = MAGVITv2Config(
    ch=8, encoder_ch_mult=(1, 2, 2), encoder_num_res_blocks=(1, 2, 1), decoder_ch_mult=(1, 1, 2),
    decoder_num_res_blocks=(2, 1, 1), norm_groups=4, resolution=16,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py



def _randomized(cfg: MAGVITv2Config = TINY, seed: int = 0) -> MAGVITv2:
    """A tiny model whose norms and biases are random too, so a wrongly loaded tensor shows in the output."""
    torch.manual_seed(seed)
    model = MAGVITv2(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def _images(b: int = 2, h: int = 16, w: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def test_encode_decode_shapes_and_code_range():
    model = _randomized()
    x = _images(3)
    codes = model.encode(x)
    assert codes.shape == (3, 16) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < 8192 == model.num_codes
    assert model.grid == (4, 4) and model.image_size == (16, 16)
    out = model.decode(codes)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32
    assert float(out.abs().max()) <= 1.0
    u8 = MAGVITv2.to_uint8(out)
    assert u8.shape == (3, 16, 16, 3) and u8.dtype == torch.uint8


def test_codes_are_the_msb_first_signs_of_the_latents():
    model = _randomized()
    x = _images(2, 16, 32)
    z = model.encode_latents(x)  # (B, 13, 4, 8)
    bits = (z > 0).long().permute(0, 2, 3, 1).reshape(2, 32, 13)
    expected = (bits * (2 ** torch.arange(12, -1, -1))).sum(-1)
    assert torch.equal(model.encode(x), expected)
    assert model.decode(expected, shape=(4, 8)).shape == (2, 3, 16, 32)
    with pytest.raises(ValueError, match="not a square"):
        model.decode(expected)
    with pytest.raises(ValueError, match=r"shape=\(3, 8\)"):
        model.decode(expected, shape=(3, 8))


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_released_layout_loads_into_an_equal_model(tmp_path, fmt):
    src = _randomized(seed=3)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    assert "encoder.down.0.block.0.norm1.weight" in sd and "encoder.down.1.block.0.nin_shortcut.weight" in sd
    assert "encoder.down.0.downsample.conv.weight" in sd and "encoder.mid.block_2.conv2.bias" in sd
    assert "decoder.up.1.upsample.conv.weight" in sd and "quant_conv.weight" in sd
    if fmt == "bin":
        torch.save(sd, tmp_path / "pytorch_model.bin")
    else:
        save_file(sd, str(tmp_path / "model.safetensors"))
    loaded = MAGVITv2.from_pretrained(tmp_path, config=TINY)
    inferred = MAGVITv2.from_pretrained(tmp_path / ("pytorch_model.bin" if fmt == "bin" else "model.safetensors"),
                                        config=MAGVITv2Config.from_state_dict(sd, norm_groups=4, resolution=16))
    assert inferred.config == TINY
    x = _images(2)
    for model in (loaded, inferred):
        assert torch.equal(model.encode(x), src.encode(x))
        assert torch.equal(model.encode_latents(x), src.encode_latents(x))
        codes = src.encode(x)
        assert torch.equal(model.decode(codes), src.decode(codes))


def test_key_variants_and_bias_free_convs_map_onto_the_layout():
    src = _randomized(seed=4)
    with torch.no_grad():
        src.encoder.conv_in.bias.zero_()
    sd = {}
    for k, v in src.state_dict().items():
        k = k.replace("encoder.mid.block_1.", "encoder.mid.0.").replace("decoder.mid.block_2.", "decoder.mid_block.1.")
        k = k.replace("quant_conv.", "encoder.quant_conv.") if k.startswith("quant_conv.") else k
        k = k.replace("downsample.conv.", "downsample.")
        if k != "encoder.conv_in.bias":  # a release built with bias=False
            sd["module." + k] = v
    sd["quantize.codebook"] = torch.ones(4, 13)  # LFQ buffers are dropped
    model = MAGVITv2(TINY)
    load_magvit_state_dict(model, sd)
    x = _images(2)
    assert torch.equal(model.encode_latents(x), src.encode_latents(x))
    assert set(map_magvit_keys(sd)) == set(src.state_dict()) - {"encoder.conv_in.bias"}


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    sd = dict(_randomized().state_dict())
    sd["encoder.down.1.block.0.conv1.weight"] = torch.zeros(16, 8, 1, 3)
    del sd["decoder.norm_out.weight"]
    sd["encoder.extra.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError) as err:
        MAGVITv2.from_pretrained(tmp_path, config=TINY)
    msg = str(err.value)
    assert "encoder.down.1.block.0.conv1.weight: checkpoint (16, 8, 1, 3) vs model (16, 8, 3, 3)" in msg
    assert "missing keys: decoder.norm_out.weight" in msg and "unexpected keys: encoder.extra.weight" in msg
    assert str(tmp_path) in msg


class _Payload:
    """Unpickling this would create a file: the loader must refuse it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickle_carrying_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    sd = dict(_randomized().state_dict())
    sd["encoder.conv_in.weight"] = _Payload(str(marker))
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: refused to unpickle"):
        MAGVITv2.from_pretrained(tmp_path, config=TINY)
    assert not marker.exists()


def test_save_pretrained_round_trip(tmp_path):
    src = _randomized(seed=5)
    src.save_pretrained(tmp_path / "tok")
    loaded = MAGVITv2.from_pretrained(tmp_path / "tok")  # sizes from our config.json
    assert loaded.config == TINY
    x = _images(1)
    assert torch.equal(loaded.encode_latents(x), src.encode_latents(x))


def test_bad_inputs_name_the_argument_and_shape():
    model = MAGVITv2(TINY)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got shape \(2, 4, 16, 16\)"):
        model.encode(torch.zeros(2, 4, 16, 16))
    with pytest.raises(ValueError, match=r"multiples of the stride 4, got shape \(1, 3, 18, 16\)"):
        model.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(ValueError, match=r"float tensor.*dtype=torch\.uint8"):
        model.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[−1, 1\].*max=255"):
        model.encode(torch.full((1, 3, 16, 16), 255.0))
    with pytest.raises(ValueError, match=r"integer tensor \(B, N\)"):
        model.decode(torch.zeros(1, 16))
    with pytest.raises(ValueError, match="divisible by norm_groups"):
        MAGVITv2Config(ch=8, norm_groups=32)
