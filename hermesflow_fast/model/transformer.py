"""The unified transformer: a lean Phi decoder (Show-o's backbone) whose LM head stays separate.

Per layer (Phi: parallel attention and MLP behind one LayerNorm):

    h = LN(x);  x ← x + Dense(Attn(RoPE_partial(Q h), RoPE_partial(K h), V h)) + FC2(gelu_tanh(FC1 h))

RoPE rotates the first ``rotary_dim = head_dim · partial_rotary_factor`` dims of each head (halves rotated, θ 10,000);
optional LayerNorm over head_dim on q and k (``qk_layernorm``). The final LayerNorm ends ``forward``, which returns
hidden states (B, T, d); the untied LM head (``lm_head.weight`` (V, d), ``lm_head.bias`` (V,)) is applied only by
``logits()`` or by the trainer's fused log-prob op on target rows.

Module names equal transformers' ``PhiForCausalLM`` (``model.layers.N.self_attn.q_proj`` …), so state dicts map 1:1
(model/weights.py). The mask is Show-o's omni-attention mask in any accepted form (model/masks.py): an
``OmniMask`` or a boolean ``(B, T, T)`` / ``(B, 1, T, T)`` tensor, True = may attend; ``None`` means causal.

    python -m pytest -q tests/model/test_transformer.py
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hermesflow_fast.model.attention import MaskPlan, attend, prepare, resolve_backend
from hermesflow_fast.model.config import ModelConfig
from hermesflow_fast.model.masks import OmniMask, as_dense_mask

__all__ = ["KVCache", "UnifiedTransformer"]

_Mask = OmniMask | Tensor | MaskPlan | None  # what a layer passes to attention.attend


class KVCache:
    """Pre-allocated keys and values of every layer: k/v (L, B, H, max_len, D); ``length`` tokens are filled.

    Rows can be repeated after the prefill (``repeat_interleave``: K samples of one prefix computed once) and
    the cache keeps the per-token mask tags of what it holds so later steps can attend correctly.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str
                 ) -> None:
        shape = (cfg.num_hidden_layers, batch, cfg.num_attention_heads, max_len, cfg.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0
        self.max_len = max_len
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # keys that may be attended

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's k/v (B, H, Tq, D) after the filled part; return all keys/values so far."""
        t0, t1 = self.length, self.length + k.shape[2]
        self.k[layer, :, :, t0:t1] = k
        self.v[layer, :, :, t0:t1] = v
        k_all, v_all = self.k[layer, :, :, :t1], self.v[layer, :, :, :t1]
        if k_all.device.type == "cpu":  # CPU SDPA with a mask is ~30× slower on these strided views than a copy
            return k_all.contiguous(), v_all.contiguous()
        return k_all, v_all

    def reserve(self, n: int) -> None:
        if self.length + n > self.max_len:
            raise ValueError(f"KVCache holds at most {self.max_len} tokens; {self.length} + {n} new do not fit")

    def repeat_interleave(self, repeats: int) -> KVCache:
        """A cache whose rows are each row of this one repeated ``repeats`` times (filled part only is copied)."""
        out = KVCache.__new__(KVCache)
        out.k = self.k.repeat_interleave(repeats, dim=1)
        out.v = self.v.repeat_interleave(repeats, dim=1)
        out.valid = self.valid.repeat_interleave(repeats, dim=0)
        out.length, out.max_len = self.length, self.max_len
        return out


class PhiAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, H = cfg.hidden_size, cfg.num_attention_heads
        self.num_heads, self.head_dim, self.rotary_dim = H, cfg.head_dim, cfg.rotary_dim
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.dense = nn.Linear(d, d)
        if cfg.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(cfg.head_dim, eps=cfg.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(cfg.head_dim, eps=cfg.layer_norm_eps)
        else:
            self.q_layernorm = self.k_layernorm = None

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        r = self.rotary_dim
        if r == 0:
            return x
        x_rot, x_pass = x[..., :r], x[..., r:]
        x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2:]
        rotated = torch.cat((-x2, x1), dim=-1)
        return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, mask: _Mask, backend: str, cache: KVCache | None,
                layer: int, keep: Tensor | None = None) -> Tensor:
        """(B, T, d) → (B, T, d); with ``keep`` (B, U) only those queries: (B, U, d) (keys/values still all T, and
        ``mask`` then covers the kept queries only)."""
        B, T, _ = h.shape
        shape = (B, T, self.num_heads, self.head_dim)
        hq, cq, sq = h, cos, sin
        if keep is not None:
            hq, cq, sq = _take(h, keep, 1), _take(cos, keep, 2), _take(sin, keep, 2)
        q = self.q_proj(hq).view(B, hq.shape[1], *shape[2:]).transpose(1, 2)  # (B, H, T or U, D)
        k = self.k_proj(h).view(shape).transpose(1, 2)
        v = self.v_proj(h).view(shape).transpose(1, 2)
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = self._rope(q, cq, sq), self._rope(k, cos, sin)
        if cache is not None:
            k, v = cache.write(layer, k, v)
        out = attend(q, k, v, mask, backend=backend)  # (B, H, T or U, D)
        return self.dense(out.transpose(1, 2).reshape(B, q.shape[2], -1))


class PhiMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.approximate = "tanh" if cfg.hidden_act == "gelu_new" else "none"

    def forward(self, h: Tensor) -> Tensor:
        a = self.fc1(h)
        if not torch.is_grad_enabled():  # nothing to keep for backward: gelu in place, no second (T, 4d) buffer
            return self.fc2(torch.ops.aten.gelu_(a, approximate=self.approximate))
        return self.fc2(F.gelu(a, approximate=self.approximate))


class PhiLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = PhiAttention(cfg)
        self.mlp = PhiMLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: _Mask, backend: str, cache: KVCache | None = None,
                layer: int = 0, keep: Tensor | None = None) -> Tensor:
        h = self.input_layernorm(x)
        a = self.self_attn(h, cos, sin, mask, backend, cache, layer, keep)
        if keep is not None:  # the outputs at the kept positions only: (B, U, d)
            x, h = _take(x, keep, 1), _take(h, keep, 1)
        return x + a + self.mlp(h)


def _take(t: Tensor, index: Tensor, dim: int) -> Tensor:
    """``t`` (B or 1, 1…, T, *rest) at positions ``index`` (B, U) along ``dim`` → (B, 1…, U, *rest): one row gather."""
    B, U = index.shape
    T, lead, rest = t.shape[dim], t.shape[1:dim], t.shape[dim + 1:]
    rows = t.expand(B, *t.shape[1:]).reshape(B * T, *rest)  # the dims between batch and ``dim`` are all size 1
    flat = (index + torch.arange(B, device=index.device).unsqueeze(1) * T).reshape(-1)
    return rows.index_select(0, flat).view(B, *lead, U, *rest)


class PhiBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(PhiLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class UnifiedTransformer(nn.Module):
    """Show-o's backbone. ``forward`` → hidden states (B, T, d); ``logits`` → (B, T, V)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = PhiBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        r = config.rotary_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, r, 2, dtype=torch.float64) / max(r, 1)))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.gradient_checkpointing = False
        self.reset_parameters()

    # -- construction ---------------------------------------------------------------------------------------------
    def reset_parameters(self, std: float = 0.02) -> None:
        """Phi's init: normal(0, 0.02) linear/embedding weights, zero biases, unit LayerNorms."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> UnifiedTransformer:
        """A folder in HF Phi layout (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``) or as Show-o's
        ``save_pretrained`` writes it (``pytorch_model.safetensors`` …); model/weights.py lists every name read."""
        from hermesflow_fast.model.weights import load_pretrained

        return load_pretrained(cls, path, **kwargs)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """``config.json`` + ``model.safetensors`` (loadable by ``transformers.PhiForCausalLM`` too)."""
        from hermesflow_fast.model.weights import save_pretrained

        save_pretrained(self, path)

    # -- forward --------------------------------------------------------------------------------------------------
    def _check_inputs(self, input_ids: Tensor, position_ids: Tensor) -> None:
        V, P = self.config.vocab_size, self.config.max_position_embeddings
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if torch.compiler.is_compiling():
            return
        if input_ids.device.type == "cpu" or os.environ.get("HFF_DEBUG") == "1":
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= V:
                bad = input_ids.lt(0) | input_ids.ge(V)
                b, t = (int(i) for i in bad.nonzero()[0])
                raise ValueError(f"input_ids[{b}, {t}] = {int(input_ids[b, t])} is outside the vocabulary [0, {V})")
            pmax = int(position_ids.max())
            if pmax >= P or int(position_ids.min()) < 0:
                raise ValueError(f"position ids reach {pmax}, but the model has {P} positions "
                                 f"(max_position_embeddings); the sequence is too long")

    def _rotary(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = position_ids[:, None, :, None].float() * self.inv_freq  # (B, 1, T, r/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids: Tensor, attention_mask: OmniMask | Tensor | None = None,
                position_ids: Tensor | None = None, cache: KVCache | None = None, keep: Tensor | None = None
                ) -> Tensor:
        """input_ids (B, T) → hidden states (B, T, d) after the final LayerNorm.

        With ``cache``, ``input_ids`` are the next T tokens after the cached ones; ``attention_mask`` then covers
        (B, T, cached + T) (an OmniMask covers all cached + new tokens), and ``position_ids`` default to
        ``cache.length + arange(T)``.

        ``keep`` (B, U) int64 positions in 0 … T−1: return the states there only, (B, U, d). The last layer then
        computes queries, attention and MLP at those positions only (its keys/values, cached or not, are still
        all T): the same values as ``forward(...)[b, keep[b]]`` up to float rounding, for less work.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if cache is not None:
            if cache.batch != B:
                raise ValueError(f"KVCache has batch {cache.batch} but input_ids has batch {B}")
            cache.reserve(T)
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        elif position_ids.dim() == 1:
            position_ids = position_ids.expand(B, T)
        if position_ids.shape != (B, T):
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected ({B}, {T})")
        self._check_inputs(input_ids, position_ids)

        Tk = past + T
        if attention_mask is None:
            attention_mask = torch.ones(T, Tk, dtype=torch.bool, device=input_ids.device).tril(past)
            attention_mask = attention_mask.expand(B, 1, T, Tk)
        dev = input_ids.device
        act_dtype = (torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type)
                     else self.model.embed_tokens.weight.dtype)
        backend = resolve_backend(self.config.attn_backend, dev, attention_mask, act_dtype)
        given_mask = attention_mask
        if cache is not None or backend == "eager" or not isinstance(attention_mask, OmniMask):
            attention_mask = as_dense_mask(attention_mask, B, T, Tk)  # once per forward, not per layer
            if backend not in ("sdpa", "eager"):
                backend = "sdpa"
        elif backend == "sdpa":
            attention_mask = prepare(attention_mask)  # the split by sequence/branch (or the dense mask), built once
        last = len(self.model.layers) - 1
        if keep is not None:  # the last layer's queries are the kept positions: their rows of the dense mask
            if keep.dim() != 2 or keep.shape[0] != B:
                raise ValueError(f"keep must be (B={B}, U) positions, got shape {tuple(keep.shape)}")
            keep = keep.to(dev, torch.long)
            dense = attention_mask if isinstance(attention_mask, Tensor) else as_dense_mask(given_mask, B, T, Tk)
            keep_mask = _take(dense, keep, 2)  # (B, 1, U, Tk)
            keep_backend = backend if backend in ("sdpa", "eager") else "sdpa"

        x = self.model.embed_tokens(input_ids)
        cos, sin = self._rotary(position_ids, x.dtype)
        for i, layer in enumerate(self.model.layers):
            if keep is not None and i == last:
                x = layer(x, cos, sin, keep_mask, keep_backend, cache, i, keep)
            elif self.gradient_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, attention_mask, backend,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos, sin, attention_mask, backend, cache, i)
        if cache is not None:
            cache.length += T
        return self.model.final_layernorm(x)

    def logits(self, input_ids: Tensor, attention_mask: OmniMask | Tensor | None = None,
               position_ids: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """(B, T, V) logits: forward + the LM head (inference convenience; training uses the fused op)."""
        return self.lm_head(self.forward(input_ids, attention_mask, position_ids, cache))

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch, max_len, dtype or p.dtype, p.device)

    def extra_repr(self) -> str:
        c = self.config
        return (f"d={c.hidden_size}, layers={c.num_hidden_layers}, heads={c.num_attention_heads}, "
                f"vocab={c.vocab_size}, params={c.num_parameters() / 1e6:.1f}M, head_dim={c.head_dim}, "
                f"rotary_dim={c.rotary_dim}, qk_layernorm={c.qk_layernorm}, "
                f"scale={1 / math.sqrt(c.head_dim):.4f}")
