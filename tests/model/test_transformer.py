"""UnifiedTransformer: parity with transformers' PhiForCausalLM, checkpoints (HF, Show-o, ours), KV cache, compile,
bad input."""

import json
import os

import pytest
import torch

from hermesflow_fast.model import ModelConfig, OmniMask, UnifiedTransformer
from hermesflow_fast.model.weights import CheckpointError

transformers = pytest.importorskip("transformers")


def _hf_model(cfg: ModelConfig):
    hf_cfg = transformers.PhiConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k != "hermesflow"})
    return transformers.PhiForCausalLM(hf_cfg).eval()


def _random_mask(B, T):
    mask = torch.rand(B, T, T) < 0.4
    return mask | torch.eye(T, dtype=torch.bool)


@pytest.mark.parametrize("qk_layernorm", [False, True])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_logits_match_transformers_phi(qk_layernorm, impl):
    cfg = ModelConfig.tiny(vocab_size=300, qk_layernorm=qk_layernorm, partial_rotary_factor=0.5)
    ours = UnifiedTransformer(cfg).eval()
    hf = _hf_model(cfg)
    hf.load_state_dict(ours.state_dict(), strict=True)
    hf.config._attn_implementation = impl
    B, T = 3, 21
    ids = torch.randint(0, 300, (B, T))
    mask = _random_mask(B, T)
    pos = torch.randint(0, 100, (B, T))
    hf_mask = mask[:, None] if impl == "sdpa" else torch.zeros(B, 1, T, T).masked_fill(
        ~mask[:, None], torch.finfo(torch.float32).min)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=hf_mask, position_ids=pos).logits
        got = ours.logits(ids, mask, pos)
        got4 = ours.logits(ids, mask[:, None], pos)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got4, got)


def test_default_mask_is_causal():
    cfg = ModelConfig.tiny(vocab_size=100)
    m = UnifiedTransformer(cfg).eval()
    ids = torch.randint(0, 100, (2, 9))
    causal = torch.ones(9, 9, dtype=torch.bool).tril().expand(2, 9, 9)
    torch.testing.assert_close(m(ids), m(ids, causal))


def test_save_pretrained_round_trip_and_transformers_reads_it(tmp_path):
    cfg = ModelConfig.tiny(vocab_size=128, qk_layernorm=True)
    m = UnifiedTransformer(cfg).eval()
    m.save_pretrained(tmp_path / "ours")
    assert {p.name for p in (tmp_path / "ours").iterdir()} == {"config.json", "model.safetensors"}
    back = UnifiedTransformer.from_pretrained(tmp_path / "ours")
    ids = torch.randint(0, 128, (2, 11))
    torch.testing.assert_close(back.logits(ids), m.logits(ids), atol=0, rtol=0)
    assert back.config.qk_layernorm
    hf = transformers.PhiForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, m.logits(ids), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_loads_hf_phi_folder(tmp_path, fmt):
    cfg = ModelConfig.tiny(vocab_size=128)
    hf = _hf_model(cfg)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=(fmt == "safetensors"))
    if fmt == "bin":  # transformers 5 always writes safetensors; write the .bin layout by hand
        (tmp_path / "hf" / "model.safetensors").unlink(missing_ok=True)
        torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    ours = UnifiedTransformer.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ids), hf(input_ids=ids).logits, atol=2e-5, rtol=1e-5)
    assert ours.loaded_from["layout"] == "phi"


def _write_showo(tmp_path, cfg, sd, fmt="bin"):
    folder = tmp_path / "showo"
    folder.mkdir()
    keys = {f"showo.{k}": v.clone() for k, v in sd.items()}
    keys["showo.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old Phi buffer: ignored
    if fmt == "bin":
        torch.save(keys, folder / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(keys, str(folder / "model.safetensors"))
    # Show-o's wrapper config names the vocabulary and the LLM, not the Phi sizes
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "Showo", "llm_model_path": "microsoft/phi-1_5", "vocab_size": cfg.vocab_size,
        "llm_vocab_size": 100, "codebook_size": 64, "num_vq_tokens": 16, "w_clip_vit": False,
    }))
    return folder


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_loads_show_o_layout(tmp_path, fmt):
    cfg = ModelConfig.tiny(vocab_size=175)
    src = UnifiedTransformer(cfg).eval()
    folder = _write_showo(tmp_path, cfg, src.state_dict(), fmt)
    m = UnifiedTransformer.from_pretrained(folder, config=cfg).eval()
    assert m.loaded_from["layout"] == "show-o"
    ids = torch.randint(0, 175, (2, 9))
    torch.testing.assert_close(m.logits(ids), src.logits(ids), atol=0, rtol=0)


def test_show_o_wrapper_config_gives_phi15_sizes():
    c = ModelConfig.from_dict({"_class_name": "Showo", "llm_model_path": "microsoft/phi-1_5", "vocab_size": 58498})
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (2048, 24, 32, 8192)
    assert c.vocab_size == 58498 and c.rotary_dim == 32 and not c.qk_layernorm
    assert 1.3e9 < c.num_parameters() < 1.5e9


def test_vocab_mismatch_names_tensor_and_shapes(tmp_path):
    cfg = ModelConfig.tiny(vocab_size=175)
    folder = _write_showo(tmp_path, cfg, UnifiedTransformer(cfg).state_dict())
    with pytest.raises(CheckpointError, match=r"model.embed_tokens.weight.*\(175, 64\).*\(180, 64\).*vocab"):
        UnifiedTransformer.from_pretrained(folder, config=ModelConfig.tiny(vocab_size=180))


def test_missing_tensor_is_named(tmp_path):
    cfg = ModelConfig.tiny(vocab_size=64)
    sd = UnifiedTransformer(cfg).state_dict()
    del sd["model.layers.1.mlp.fc2.bias"]
    folder = tmp_path / "m"
    folder.mkdir()
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.fc2.bias"):
        UnifiedTransformer.from_pretrained(folder)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_carrying_code_is_refused(tmp_path):
    cfg = ModelConfig.tiny(vocab_size=64)
    folder = tmp_path / "evil"
    folder.mkdir()
    sd = dict(UnifiedTransformer(cfg).state_dict())
    sd["payload"] = _Evil()
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: refused to unpickle.*weights_only"):
        UnifiedTransformer.from_pretrained(folder)


def test_bad_inputs_are_named():
    cfg = ModelConfig.tiny(vocab_size=50, max_position_embeddings=16)
    m = UnifiedTransformer(cfg)
    with pytest.raises(ValueError, match=r"input_ids\[1, 2\] = 50 is outside the vocabulary \[0, 50\)"):
        ids = torch.zeros(2, 4, dtype=torch.long)
        ids[1, 2] = 50
        m(ids)
    with pytest.raises(ValueError, match="too long"):
        m(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5, 5\).*\(2, 4, 4\)"):
        m(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be bool"):
        m(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match=r"input_ids must be \(B, T\)"):
        m(torch.zeros(4, dtype=torch.long))


def test_kv_cache_matches_full_forward():
    cfg = ModelConfig.tiny(vocab_size=90)
    m = UnifiedTransformer(cfg).eval()
    B, T = 2, 14
    ids = torch.randint(0, 90, (B, T))
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    mask[:6, :6] = True  # a bidirectional prefix of 6 tokens, then causal
    mask = mask.expand(B, T, T)
    with torch.no_grad():
        full = m(ids, mask)
        cache = m.new_cache(B, T)
        parts = [m(ids[:, :6], mask[:, :6, :6], cache=cache)]
        for t in range(6, T):
            parts.append(m(ids[:, t:t + 1], mask[:, t:t + 1, : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == T


@pytest.mark.parametrize("qk_layernorm", [False, True])
def test_keep_returns_the_full_forward_at_those_positions(qk_layernorm):
    """forward(keep=) computes the last layer at the kept positions only: the same states as the full forward there,
    with a dense mask, an OmniMask (padding, a bidirectional block), no mask, and with a KV cache."""
    cfg = ModelConfig.tiny(vocab_size=90, qk_layernorm=qk_layernorm)
    m = UnifiedTransformer(cfg).eval()
    B, T, U = 3, 14, 5
    ids = torch.randint(0, 90, (B, T))
    pos = torch.arange(T).expand(B, T)
    keep = torch.stack([torch.randperm(T)[:U] for _ in range(B)])
    rows = torch.arange(B).unsqueeze(1)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :2] = False  # left padding in row 0
    block = torch.full((B, T), -1, dtype=torch.int32)
    block[:, 6:11] = 0  # a bidirectional block
    omni = OmniMask(valid, block, torch.zeros_like(block))
    with torch.no_grad():
        for mask in (_random_mask(B, T), omni, None):
            full = m(ids, mask, pos)
            got = m(ids, mask, pos, keep=keep)
            assert got.shape == (B, U, cfg.hidden_size)
            torch.testing.assert_close(got, full[rows, keep], atol=1e-5, rtol=1e-5)
        dense = omni.dense()  # (B, T, T); the first 6 tokens see no later token: a cacheable prefix
        full = m(ids, dense, pos)
        cache = m.new_cache(B, T)
        m(ids[:, :6], dense[:, :6, :6], pos[:, :6], cache=cache)
        tail = torch.stack([torch.randperm(T - 6)[:U] for _ in range(B)])
        got = m(ids[:, 6:], dense[:, 6:], pos[:, 6:], cache=cache, keep=tail)
        assert cache.length == T
        torch.testing.assert_close(got, full[:, 6:][rows, tail], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="keep must be"):
        m(ids, None, pos, keep=keep[:2])


def test_gradient_checkpointing_same_grads():
    cfg = ModelConfig.tiny(vocab_size=60)
    m = UnifiedTransformer(cfg)
    ids = torch.randint(0, 60, (2, 10))
    m.logits(ids).square().mean().backward()
    g = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.gradient_checkpointing = True
    m.logits(ids).square().mean().backward()
    for a, p in zip(g, m.parameters()):
        torch.testing.assert_close(p.grad, a)


@pytest.mark.slow
def test_torch_compile_forward_matches_eager():
    cfg = ModelConfig.tiny(vocab_size=64, num_hidden_layers=1)
    m = UnifiedTransformer(cfg).eval()
    ids = torch.randint(0, 64, (2, 12))
    mask = _random_mask(2, 12)
    compiled = torch.compile(m)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, mask), m(ids, mask), atol=1e-5, rtol=1e-5)
