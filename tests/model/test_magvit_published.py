"""MAGVITv2Config() is Show-o's published tokenizer exactly, and its checkpoints load as Show-o writes them.

Show-o's ``MAGVITv2()`` (models/modeling_magvitv2.py) builds ``VQGANEncoder()`` / ``VQGANDecoder()`` /
``LFQuantizer()`` with their default arguments; ``_show_o_keys`` below lists the state-dict keys and shapes that
construction gives, from its rules: res-blocks with a 1×1 ``nin_shortcut`` where the width changes, a stride-2
``downsample.conv`` after every encoder level but the last, an ``upsample.conv`` after every decoder level but the
finest, ``mid.block_1`` / ``mid.attn_1`` / ``mid.block_2`` in both, ``encoder.quant_conv`` and
``decoder.post_quant_conv`` (1×1), and the LFQ's ``quantize.embedding`` / ``quantize.power_vals`` tables.

    python -m pytest -q tests/model/test_magvit_published.py
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from hermesflow_fast.model.magvit import MAGVITv2, MAGVITv2Config, map_magvit_keys
from hermesflow_fast.model.magvit_checkpoint import IGNORED_PREFIXES, map_key
from hermesflow_fast.model.tokenizer_vq import load_image_tokenizer
from hermesflow_fast.model.weights import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py

SHOW_O_SIZES = dict(ch=128, enc_mult=(1, 2, 2, 4, 4), enc_blocks=(4, 3, 4, 3, 4), dec_mult=(1, 1, 2, 2, 4),
                    dec_blocks=(4, 4, 3, 4, 3), z=13)
TINY_SIZES = dict(ch=32, enc_mult=(1, 2), enc_blocks=(1, 2), dec_mult=(1, 2), dec_blocks=(2, 1), z=13)


def _show_o_keys(ch: int, enc_mult: tuple[int, ...], enc_blocks: tuple[int, ...], dec_mult: tuple[int, ...],
                 dec_blocks: tuple[int, ...], z: int) -> dict[str, tuple[int, ...]]:
    """The state-dict keys → shapes of Show-o's MAGVITv2 built with these sizes (its VQGANEncoder/Decoder rules)."""
    keys: dict[str, tuple[int, ...]] = {}

    def conv(name: str, c_in: int, c_out: int, k: int) -> None:
        keys[f"{name}.weight"], keys[f"{name}.bias"] = (c_out, c_in, k, k), (c_out,)

    def norm(name: str, c: int) -> None:
        keys[f"{name}.weight"], keys[f"{name}.bias"] = (c,), (c,)

    def resnet(name: str, c_in: int, c_out: int) -> None:
        norm(f"{name}.norm1", c_in)
        conv(f"{name}.conv1", c_in, c_out, 3)
        norm(f"{name}.norm2", c_out)
        conv(f"{name}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{name}.nin_shortcut", c_in, c_out, 1)

    def mid(part: str, c: int) -> None:
        resnet(f"{part}.mid.block_1", c, c)
        norm(f"{part}.mid.attn_1.norm", c)
        for proj in ("q", "k", "v", "proj_out"):
            conv(f"{part}.mid.attn_1.{proj}", c, c, 1)
        resnet(f"{part}.mid.block_2", c, c)

    conv("encoder.conv_in", 3, ch, 3)
    c = ch
    for i, (mult, n) in enumerate(zip(enc_mult, enc_blocks)):
        for j in range(n):
            resnet(f"encoder.down.{i}.block.{j}", c, ch * mult)
            c = ch * mult
        if i != len(enc_mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
    mid("encoder", c)
    norm("encoder.norm_out", c)
    conv("encoder.conv_out", c, z, 3)
    conv("encoder.quant_conv", z, z, 1)

    c = ch * dec_mult[-1]
    conv("decoder.conv_in", z, c, 3)
    mid("decoder", c)
    for i in reversed(range(len(dec_mult))):
        for j in range(dec_blocks[i]):
            resnet(f"decoder.up.{i}.block.{j}", c, ch * dec_mult[i])
            c = ch * dec_mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", c)
    conv("decoder.conv_out", c, 3, 3)
    conv("decoder.post_quant_conv", z, z, 1)
    keys["quantize.embedding"], keys["quantize.power_vals"] = (2**z, z), (z,)
    return keys


def _lfq_tables(z: int) -> dict[str, torch.Tensor]:
    """Show-o's LFQuantizer buffers: code i's bits (most significant first) as ±1, and the bit weights."""
    bits = (torch.arange(2**z)[:, None] >> torch.arange(z - 1, -1, -1)) & 1
    return {"quantize.embedding": bits.float() * 2 - 1, "quantize.power_vals": 2 ** torch.arange(z - 1, -1, -1)}


def _show_o_release(sizes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(shape, generator=g) * 0.1 for k, shape in _show_o_keys(**sizes).items()}
    return sd | _lfq_tables(sizes["z"])


def _config_of(sizes: dict, **kw) -> MAGVITv2Config:
    return MAGVITv2Config(ch=sizes["ch"], encoder_ch_mult=sizes["enc_mult"], encoder_num_res_blocks=sizes["enc_blocks"],
                          decoder_ch_mult=sizes["dec_mult"], decoder_num_res_blocks=sizes["dec_blocks"],
                          z_channels=sizes["z"], **kw)


def test_default_config_is_show_o_published_key_set():
    published = _show_o_keys(**SHOW_O_SIZES)
    assert {"encoder.mid.attn_1.q.weight", "decoder.mid.attn_1.proj_out.bias", "encoder.quant_conv.weight",
            "decoder.post_quant_conv.weight"} <= set(published)
    with torch.device("meta"):
        model = MAGVITv2()  # the default config, no memory
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapped = {map_key(k): shape for k, shape in published.items() if not map_key(k).startswith(IGNORED_PREFIXES)}
    assert mapped == ours  # no missing, no unexpected key, every shape equal
    assert len(published) == len(ours) + 2  # + the LFQ's two tables
    meta = {k: torch.empty(shape, device="meta") for k, shape in published.items()}
    assert MAGVITv2Config.from_state_dict(map_magvit_keys(meta)) == MAGVITv2Config()


@pytest.mark.parametrize("file", ["pytorch_model.safetensors", "pytorch_model.bin"])
def test_tiny_show_o_release_loads_with_the_default_structure(tmp_path, file):
    sd = _show_o_release(TINY_SIZES)
    if file.endswith(".bin"):
        torch.save(sd, tmp_path / file)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / file), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "MAGVITv2", "_diffusers_version": "0.30.1"}))
    model = load_image_tokenizer(tmp_path)
    assert isinstance(model, MAGVITv2)
    assert model.config == _config_of(TINY_SIZES)  # mid attention and post_quant_conv: the defaults
    assert model.config.mid_attention and model.config.post_quant_conv
    own = model.state_dict()
    for key, value in sd.items():
        if not key.startswith("quantize."):
            assert torch.equal(own[map_key(key)], value), key
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    codes = model.encode(x)
    assert codes.shape == (2, 64) and model.decode(codes).shape == (2, 3, 16, 16)


def test_lfq_tables_are_checked_and_learned_codebooks_refused(tmp_path):
    sd = _show_o_release(TINY_SIZES)
    lsb_first = sd["quantize.embedding"].flip(-1)
    torch.save(sd | {"quantize.embedding": lsb_first}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"'quantize\.embedding' \(8192, 13\) is not the LFQ table of 13 bits"):
        MAGVITv2.from_pretrained(tmp_path)
    torch.save(sd | {"quantize.power_vals": torch.ones(13, dtype=torch.long)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"'quantize\.power_vals' \(13,\) is not the LFQ table"):
        MAGVITv2.from_pretrained(tmp_path)
    torch.save(sd | {"quantize.embedding.weight": torch.zeros(16, 13)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"'quantize\.embedding\.weight' is a learned codebook"):
        MAGVITv2.from_pretrained(tmp_path)


def test_older_folders_load_as_they_were_written(tmp_path):
    old = _config_of(TINY_SIZES, mid_attention=False, post_quant_conv=False, resolution=16)
    src = MAGVITv2(old)
    src.save_pretrained(tmp_path / "saved")  # our config.json names both flags: honoured
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    loaded = MAGVITv2.from_pretrained(tmp_path / "saved")
    assert loaded.config == old and torch.equal(loaded.encode_latents(x), src.encode_latents(x))

    cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
    del cfg["mid_attention"], cfg["post_quant_conv"]  # a config.json that does not name them: the tensors say
    (tmp_path / "saved" / "config.json").write_text(json.dumps(cfg))
    assert MAGVITv2.from_pretrained(tmp_path / "saved").config == old

    (tmp_path / "saved" / "config.json").unlink()  # a release without our config: all read off the tensors
    assert MAGVITv2.from_pretrained(tmp_path / "saved").config == _config_of(TINY_SIZES, mid_attention=False,
                                                                              post_quant_conv=False)


def test_mid_attention_in_one_half_only_is_refused():
    sd = {k: v for k, v in _show_o_release(TINY_SIZES).items() if not k.startswith("decoder.mid.attn_1.")}
    with pytest.raises(CheckpointError, match=r"mid\.attn_1 only in the encoder"):
        MAGVITv2Config.from_state_dict(sd)


def test_mid_attention_and_post_quant_conv_compute_as_show_o():
    torch.manual_seed(0)
    model = MAGVITv2(_config_of(TINY_SIZES, resolution=16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    attn = model.encoder.mid.attn_1
    x = torch.randn(2, 64, 3, 5)
    with torch.no_grad():  # Show-o's AttnBlock: softmax over keys of qᵀk · C^−½, values mixed, proj_out, residual
        n = attn.norm(x)
        q, k, v = (m(n).flatten(2) for m in (attn.q, attn.k, attn.v))  # (B, C, hw)
        w = torch.softmax(q.transpose(1, 2) @ k * 64**-0.5, dim=2)  # (B, hw_q, hw_k)
        want = x + attn.proj_out((v @ w.transpose(1, 2)).reshape(x.shape))
        torch.testing.assert_close(attn(x), want, atol=1e-5, rtol=1e-5)
    codes = torch.randint(0, 2**13, (2, 16))
    table = _lfq_tables(13)["quantize.embedding"]
    z = table[codes].reshape(2, 4, 4, 13).permute(0, 3, 1, 2)  # Show-o's get_codebook_entry
    with torch.no_grad():  # Show-o's decoder runs post_quant_conv first
        want = model.decoder(model.post_quant_conv(z)).clamp(-1, 1)
    torch.testing.assert_close(model.decode(codes), want, atol=1e-5, rtol=1e-5)
