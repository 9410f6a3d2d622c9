"""Transformer checkpoints written as their authors write them load, and nothing in them is dropped silently.

* microsoft/phi-1_5's config.json (``"num_key_value_heads": null`` and the other keys it publishes) + its weights:
  the logits equal transformers' ``PhiForCausalLM`` on the same weights.
* Show-o's ``ModelMixin.save_pretrained`` folders (its wrapper config.json + ``showo.``-prefixed keys) under every name
  it writes: ``pytorch_model.safetensors`` (safe_serialization=True, its default), ``pytorch_model.bin``, the sharded
  forms (``pytorch_model-0000k-of-0000n.*`` + ``diffusion_pytorch_model.*.index.json``) and a ``variant``; each
  equals the same weights loaded from our layout.
* Show-o's ``w_clip_vit`` checkpoints (an ``mm_projector.*`` CLIP-ViT projector) and any other tensor the model has
  no place for are refused naming the file and the keys; only the rotary ``inv_freq`` buffers are left out.

    python -m pytest -q tests/model/test_published_checkpoints.py
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from hermesflow_fast.errors import UserError
from hermesflow_fast.model import ModelConfig, UnifiedTransformer
from hermesflow_fast.model.weights import WEIGHT_FILES, CheckpointError, read_model_config

transformers = pytest.importorskip("transformers")
hub = pytest.importorskip("huggingface_hub")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py

# microsoft/phi-1_5's config.json, key for key, at tiny sizes (hidden 64, 2 layers, 4 heads, vocabulary 300)
PHI_15_STYLE = {
    "_name_or_path": "microsoft/phi-1_5",
    "architectures": ["PhiForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": None,
    "embd_pdrop": 0.0,
    "eos_token_id": None,
    "hidden_act": "gelu_new",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 256,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 128,
    "model_type": "phi",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": None,
    "partial_rotary_factor": 0.5,
    "qk_layernorm": False,
    "resid_pdrop": 0.0,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.37.0",
    "use_cache": True,
    "vocab_size": 300,
}


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every tensor random (LayerNorms and biases too), so a tensor loaded into the wrong place shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            around = 1.0 if "layernorm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + around)
    return model


def _phi_15_folder(folder, **overrides):
    """A Phi folder as microsoft/phi-1_5 publishes it: its config.json + model.safetensors written by transformers."""
    cfg = dict(PHI_15_STYLE, **overrides)
    hf = _randomize(transformers.PhiForCausalLM(transformers.PhiConfig(**cfg))).eval()
    hf.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")  # the published file, not a rewrite
    return hf


def test_phi_15_config_with_null_kv_heads_loads_and_matches_transformers(tmp_path):
    hf = _phi_15_folder(tmp_path / "phi")
    ours = UnifiedTransformer.from_pretrained(tmp_path / "phi").eval()
    c = ours.config
    assert (c.num_attention_heads, c.hidden_size, c.rotary_dim, c.vocab_size) == (4, 64, 8, 300)
    assert ours.loaded_from["layout"] == "phi" and ours.loaded_from["ignored_keys"] == []
    ids = torch.randint(0, 300, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ids), hf(input_ids=ids).logits, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(("change", "message"), [
    ({"num_key_value_heads": 2}, r"grouped-query attention \(num_key_value_heads 2 != num_attention_heads 4\)"),
    ({"num_key_value_heads": 4}, None),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, r"RoPE scaling .*linear.* not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, r"RoPE scaling .*dynamic.* not supported"),
    ({"hidden_size": None}, r"hidden_size is null"),
])
def test_phi_config_keys_are_read_as_transformers_reads_them_or_refused(change, message):
    d = dict(PHI_15_STYLE, **change)
    if message is None:
        assert ModelConfig.from_dict(d, "phi/config.json").num_attention_heads == 4
        return
    with pytest.raises(ValueError, match=rf"phi/config\.json: {message}"):
        ModelConfig.from_dict(d, "phi/config.json")


def _add_variant(name: str, variant: str | None) -> str:
    """``x.ext`` → ``x.variant.ext`` (an index ``x.safetensors.index.json`` → ``x.safetensors.index.variant.json``)."""
    if variant is None:
        return name
    parts = name.split(".")
    return ".".join(parts[:-1] + [variant, parts[-1]])


def _save_like_show_o(folder, sd, *, safe: bool = True, max_shard_size="10GB", variant=None) -> list[str]:
    """Weights named and laid out as Show-o's ModelMixin.save_pretrained writes them: ``pytorch_model`` +
    ``.safetensors`` (safe_serialization, its default) or ``.bin``, the variant before the extension, shards by
    huggingface_hub's splitter named ``pytorch_model-0000k-of-0000n.*`` with diffusers' index names. Returns the
    file names written."""
    name = _add_variant("pytorch_model.safetensors" if safe else "pytorch_model.bin", variant)
    head, rest = name.split(".", 1)
    split = hub.split_torch_state_dict_into_shards(sd, max_shard_size=max_shard_size,
                                                    filename_pattern=head + "{suffix}." + rest)
    for file, names in split.filename_to_tensors.items():
        shard = {n: sd[n].contiguous() for n in names}
        if safe:
            save_file(shard, str(folder / file), metadata={"format": "pt"})
        else:
            torch.save(shard, folder / file)
    written = list(split.filename_to_tensors)
    if split.is_sharded:
        index = _add_variant("diffusion_pytorch_model.safetensors.index.json" if safe
                             else "diffusion_pytorch_model.bin.index.json", variant)
        body = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / index).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
        written.append(index)
    return written


def _show_o_config(llm_model_path: str, vocab_size: int, w_clip_vit: bool = False) -> str:
    """Show-o's config.json as its ConfigMixin writes it (diffusers: sorted keys, indent 2): the Showo(...) init
    arguments of its training configs plus _class_name, _diffusers_version and the registered mask_token_id."""
    d = {"_class_name": "Showo", "_diffusers_version": "0.30.1", "codebook_size": 8192,
         "llm_model_path": llm_model_path, "llm_vocab_size": 100, "load_from_showo": False,
         "mask_token_id": vocab_size - 1, "num_new_special_tokens": 10, "num_vq_tokens": 256,
         "pretrained_model_path": "showlab/show-o", "vocab_size": vocab_size, "w_clip_vit": w_clip_vit}
    return json.dumps(d, indent=2, sort_keys=True) + "\n"


@pytest.fixture()
def show_o(tmp_path):
    """(a local Phi folder for llm_model_path, our-layout folder, the model both hold; vocabulary resized to 175)."""
    (tmp_path / "phi").mkdir()
    (tmp_path / "phi" / "config.json").write_text(json.dumps(PHI_15_STYLE, indent=2))  # Show-o reads only this
    cfg = ModelConfig.from_dict(dict(PHI_15_STYLE, vocab_size=175))
    src = _randomize(UnifiedTransformer(cfg), seed=1).eval()
    src.save_pretrained(tmp_path / "ours")
    return tmp_path / "phi", tmp_path / "ours", src


@pytest.mark.parametrize(("safe", "max_shard_size", "variant", "names"), [
    (True, "10GB", None, ["pytorch_model.safetensors"]),
    (False, "10GB", None, ["pytorch_model.bin"]),
    (True, 300_000, None, ["pytorch_model-00001-of-00002.safetensors", "pytorch_model-00002-of-00002.safetensors",
                           "diffusion_pytorch_model.safetensors.index.json"]),
    (False, 300_000, None, ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                            "diffusion_pytorch_model.bin.index.json"]),
    (True, "10GB", "ema", ["pytorch_model.ema.safetensors"]),
    (True, 300_000, "ema", ["pytorch_model-00001-of-00002.ema.safetensors",
                            "pytorch_model-00002-of-00002.ema.safetensors",
                            "diffusion_pytorch_model.safetensors.index.ema.json"]),
])
def test_show_o_save_pretrained_folders_load_as_our_layout(tmp_path, show_o, safe, max_shard_size, variant, names):
    phi, ours_folder, src = show_o
    folder = tmp_path / "showo"
    folder.mkdir()
    (folder / "config.json").write_text(_show_o_config(str(phi), 175))
    sd = {f"showo.{k}": v for k, v in src.state_dict().items()}
    assert _save_like_show_o(folder, sd, safe=safe, max_shard_size=max_shard_size, variant=variant) == names
    got = UnifiedTransformer.from_pretrained(folder).eval()  # sizes: llm_model_path's config.json + vocab_size
    ref = UnifiedTransformer.from_pretrained(ours_folder).eval()
    assert got.config == ref.config and got.loaded_from["layout"] == "show-o"
    shards = sorted(n for n in names if "index" not in n)
    assert sorted(p.rsplit("/", 1)[-1] for p in got.loaded_from["files"]) == shards
    want = ref.state_dict()
    assert got.state_dict().keys() == want.keys()
    for k, v in got.state_dict().items():
        assert torch.equal(v, want[k]), k
    ids = torch.randint(0, 175, (2, 9))
    torch.testing.assert_close(got.logits(ids), ref.logits(ids), atol=0, rtol=0)


def test_show_o_wrapper_config_sizes(tmp_path):
    folder = tmp_path / "showo"
    folder.mkdir()
    (folder / "config.json").write_text(_show_o_config("microsoft/phi-1_5", 58498))
    c = read_model_config(folder)  # the published llm_model_path: phi-1.5's sizes
    assert (c.hidden_size, c.num_hidden_layers, c.vocab_size) == (2048, 24, 58498)
    (folder / "config.json").write_text(_show_o_config("some-org/other-llm", 58498))
    with pytest.raises(CheckpointError, match=r"config\.json: llm_model_path 'some-org/other-llm' is neither a "
                                              r"local folder"):
        read_model_config(folder)


def test_weights_names_looked_for_are_listed(tmp_path, show_o):
    phi, _, src = show_o
    folder = tmp_path / "showo"
    folder.mkdir()
    (folder / "config.json").write_text(_show_o_config(str(phi), 175))
    (folder / "weights.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        UnifiedTransformer.from_pretrained(folder)
    msg = str(err.value)
    assert "no weights file; looked for " + ", ".join(WEIGHT_FILES) in msg
    assert "pytorch_model.safetensors" in msg and "diffusion_pytorch_model.safetensors.index.json" in msg
    assert "found ['config.json', 'weights.safetensors']" in msg
    sd = {f"showo.{k}": v for k, v in src.state_dict().items()}
    _save_like_show_o(folder, sd, variant="ema")
    _save_like_show_o(folder, sd, variant="fp16")
    with pytest.raises(CheckpointError, match=r"several variants \['ema', 'fp16'\].*pass the one file"):
        UnifiedTransformer.from_pretrained(folder)
    one = UnifiedTransformer.from_pretrained(folder / "pytorch_model.fp16.safetensors")
    assert torch.equal(one.lm_head.weight, src.lm_head.weight)


def _projector(d: int) -> dict[str, torch.Tensor]:
    """Show-o's mm_projector keys (Sequential(Linear(1024, 2048), GELU(), Linear(2048, 2048))) at width d."""
    return {"mm_projector.0.weight": torch.randn(d, 16), "mm_projector.0.bias": torch.randn(d),
            "mm_projector.2.weight": torch.randn(d, d), "mm_projector.2.bias": torch.randn(d)}


def test_show_o_clip_vit_checkpoint_is_refused(tmp_path, show_o):
    phi, _, src = show_o
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "config.json").write_text(_show_o_config(str(phi), 175, w_clip_vit=True))
    sd = {f"showo.{k}": v for k, v in src.state_dict().items()} | _projector(64)
    _save_like_show_o(folder, sd)
    why = r"VQ tokens \(MAGVIT-v2 codes\) for understanding; Show-o's CLIP-ViT variant \(w_clip_vit\) is not supported"
    with pytest.raises(CheckpointError, match=rf"clip/config\.json: w_clip_vit is true.*mm_projector\.\*.*{why}"):
        UnifiedTransformer.from_pretrained(folder)
    with pytest.raises(CheckpointError) as err:  # the config given: the weights themselves are refused
        UnifiedTransformer.from_pretrained(folder, config=src.config)
    msg = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in msg
    assert msg.startswith(str(folder / "pytorch_model.safetensors") + ": 4 tensors under mm_projector.* (the CLIP-ViT")
    assert "would be dropped" in msg and "is not supported" in msg


def test_unexpected_tensors_are_refused_and_only_inv_freq_is_left_out(tmp_path, show_o):
    phi, _, src = show_o
    cfg = src.config
    folder = tmp_path / "showo"
    folder.mkdir()
    (folder / "config.json").write_text(_show_o_config(str(phi), 175))
    sd = {f"showo.{k}": v for k, v in src.state_dict().items()}
    sd["showo.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # recomputed from the config
    _save_like_show_o(folder, sd)
    m = UnifiedTransformer.from_pretrained(folder)
    assert m.loaded_from["ignored_keys"] == ["showo.model.layers.0.self_attn.rotary_emb.inv_freq"]

    _save_like_show_o(folder, sd | {"vision_tower.proj.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"pytorch_model\.safetensors: 1 tensors outside Show-o's transformer "
                                              r"\(not under showo\.\): \['vision_tower\.proj\.weight'\]"):
        UnifiedTransformer.from_pretrained(folder)

    plain = {k: v for k, v in src.state_dict().items()} | {"model.layers.0.mlp.fc3.weight": torch.zeros(2)}
    save_file(plain, str(folder / "pytorch_model.safetensors"))
    for strict in (True, False):  # strict=False tolerates missing tensors, never unexpected ones
        with pytest.raises(CheckpointError, match=r"pytorch_model\.safetensors \(phi layout\): 0 missing tensors \[\], "
                                                  r"1 unexpected tensors \['model\.layers\.0\.mlp\.fc3\.weight'\]"):
            UnifiedTransformer.from_pretrained(folder, config=cfg, strict=strict)

    del plain["model.layers.0.mlp.fc3.weight"], plain["model.layers.1.mlp.fc2.bias"]
    save_file(plain, str(folder / "pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing tensors \['model\.layers\.1\.mlp\.fc2\.bias'\]"):
        UnifiedTransformer.from_pretrained(folder, config=cfg)
    m = UnifiedTransformer.from_pretrained(folder, config=cfg, strict=False)
    assert m.loaded_from["missing_keys"] == ["model.layers.1.mlp.fc2.bias"]
    assert torch.equal(m.lm_head.weight, src.lm_head.weight)
