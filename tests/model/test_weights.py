"""Weights that cannot be used are refused by name: a truncated safetensors file or shard (the path), a tensor holding
NaN/inf (the tensor and its file), a broken shard index; the image tokenizers' loaders say the same."""

import json

import pytest
import torch
from safetensors.torch import save_file

from hermesflow_fast.errors import UserError
from hermesflow_fast.model import ModelConfig, UnifiedTransformer
from hermesflow_fast.model.magvit import MAGVITv2, MAGVITv2Config
from hermesflow_fast.model.tokenizer_vq import PatchVQTokenizer, load_image_tokenizer
from hermesflow_fast.model.weights import CheckpointError, check_finite

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py

TINY_MAGVIT = MAGVITv2Config(ch=8, encoder_ch_mult=(1, 2), encoder_num_res_blocks=(1, 1), decoder_ch_mult=(1, 2),
                             decoder_num_res_blocks=(1, 1), norm_groups=4, resolution=16)


def _truncate(file, keep=0.5):
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture()
def saved(tmp_path):
    model = UnifiedTransformer(ModelConfig.tiny(vocab_size=64))
    model.save_pretrained(tmp_path / "m")
    return tmp_path / "m", model


def _shard(folder, model):
    """Rewrite ``folder`` as a two-shard checkpoint with an index; returns the shard paths."""
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = sorted(sd)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in parts.items():
        save_file({k: sd[k] for k in keys}, str(folder / file))
    (folder / "model.safetensors").unlink()
    weight_map = {k: file for file, keys in parts.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return [folder / f for f in parts]


def test_truncated_weights_name_the_file(saved):
    folder, _ = saved
    _truncate(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file") as err:
        UnifiedTransformer.from_pretrained(folder)
    assert isinstance(err.value, UserError)


def test_truncated_shard_of_a_sharded_checkpoint_names_the_shard(saved):
    folder, model = saved
    shards = _shard(folder, model)
    loaded = UnifiedTransformer.from_pretrained(folder)  # the sharded layout itself loads
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)
    _truncate(shards[1], keep=0.9)
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: not a readable safetensors"):
        UnifiedTransformer.from_pretrained(folder)
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: no such file"):
        UnifiedTransformer.from_pretrained(folder)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json:1: invalid JSON"):
        UnifiedTransformer.from_pretrained(folder)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensor_is_refused_naming_tensor_and_file(saved, bad):
    folder, model = saved
    shards = _shard(folder, model)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    from safetensors.torch import load_file

    second = load_file(str(shards[1]))
    name = sorted(second)[0]
    second[name] = second[name].clone()
    second[name].view(-1)[3] = bad
    save_file(second, str(shards[1]))
    with pytest.raises(CheckpointError, match=rf"model-00002-of-00002\.safetensors: tensor '{name}' holds 1 "
                                              rf"non-finite value"):
        UnifiedTransformer.from_pretrained(folder)
    # a Show-o layout names the file and our key too
    sd[name] = second[name]
    save_file({f"showo.{k}": v for k, v in sd.items()}, str(folder / "model.safetensors"))
    for f in [*shards, folder / "model.safetensors.index.json"]:
        f.unlink()
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{name}'"):
        UnifiedTransformer.from_pretrained(folder)


def test_check_finite_counts_and_ignores_integers(tmp_path):
    check_finite({"a": torch.ones(4), "ids": torch.arange(3), "big": torch.full((4,), 3e38)}, tmp_path / "w")
    x = torch.zeros(2, 3, dtype=torch.bfloat16)
    x[0, 0], x[1, 2] = float("-inf"), float("nan")
    with pytest.raises(CheckpointError, match=r"w: tensor 'x' holds 2 non-finite value\(s\) \(NaN or ±inf\) of 6"):
        check_finite({"a": torch.ones(4), "x": x}, tmp_path / "w")


def test_image_tokenizers_name_truncated_or_non_finite_weights(tmp_path):
    vq = PatchVQTokenizer.fit(torch.rand(8, 3, 16, 16) * 2 - 1, num_codes=4, seed=0, iters=1)
    vq.save_pretrained(tmp_path / "vq")
    cb = vq.codebook.clone()
    cb[1, 2] = float("nan")
    save_file({"codebook": cb}, str(tmp_path / "vq" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"vq/model\.safetensors: tensor 'codebook' holds 1 non-finite"):
        load_image_tokenizer(tmp_path / "vq")
    _truncate(tmp_path / "vq" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"vq/model\.safetensors: not a readable safetensors file"):
        load_image_tokenizer(tmp_path / "vq")
    (tmp_path / "vq" / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"vq/config\.json:1: invalid JSON"):
        load_image_tokenizer(tmp_path / "vq")
    with pytest.raises(CheckpointError, match="nope does not exist"):
        load_image_tokenizer(tmp_path / "nope")

    MAGVITv2(TINY_MAGVIT).save_pretrained(tmp_path / "mag")
    weights = next((tmp_path / "mag").glob("*.safetensors"))
    from safetensors.torch import load_file

    sd = load_file(str(weights))
    sd["encoder.conv_in.weight"][0, 0, 0, 0] = float("inf")
    save_file(sd, str(weights))
    with pytest.raises(CheckpointError, match=rf"{weights.name}: tensor 'encoder\.conv_in\.weight' holds 1"):
        MAGVITv2.from_pretrained(tmp_path / "mag")
    _truncate(weights)
    with pytest.raises(CheckpointError, match=rf"{weights.name}: not a readable safetensors file"):
        load_image_tokenizer(tmp_path / "mag")
