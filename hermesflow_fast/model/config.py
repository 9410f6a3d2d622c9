"""Configuration of the unified transformer (Phi architecture, Show-o's backbone).

Presets: ``ModelConfig.show_o_512()`` (phi-1.5 sizes, vocabulary resized to Show-o's 58,498) and
``ModelConfig.tiny(vocab_size)`` for tests and the embedded shapes world. ``to_hf_dict`` writes a ``config.json``
that ``transformers.PhiConfig`` reads too; ``from_dict`` reads ours, HF Phi's (both the ``rope_parameters`` form and
the older ``rope_theta`` / ``partial_rotary_factor`` keys) and Show-o's wrapper config (its ``vocab_size`` over
phi-1.5's sizes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["ModelConfig"]


@dataclass
class ModelConfig:
    vocab_size: int = 58498
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    max_position_embeddings: int = 2048
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    qk_layernorm: bool = False
    hidden_act: str = "gelu_new"
    attn_backend: str = "auto"  # auto | sdpa | flex | varlen | flash | eager (model/attention.py)
    extra: dict[str, Any] = field(default_factory=dict)  # carried through config.json (e.g. the token layout)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in ("gelu_new", "gelu"):
            raise ValueError(f"hidden_act {self.hidden_act!r}: only gelu_new (Phi) and gelu are supported")
        rot = self.rotary_dim
        if rot % 2 or rot > self.head_dim:
            raise ValueError(f"partial_rotary_factor {self.partial_rotary_factor} gives {rot} rotary dims of "
                             f"head_dim {self.head_dim}; it must be even and ≤ head_dim")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def show_o_512(cls, **overrides: Any) -> ModelConfig:
        """Show-o-512: phi-1.5 (d 2048, 24 layers, 32 heads, MLP 8192), vocabulary 58,498."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, vocab_size: int = 512, **overrides: Any) -> ModelConfig:
        kw: dict[str, Any] = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=512)
        kw.update(overrides)
        return cls(**kw)

    def num_parameters(self) -> int:
        d, f, V, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        per_layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * d
        if self.qk_layernorm:
            per_layer += 4 * self.head_dim
        return V * d + L * per_layer + 2 * d + V * d + V

    def forward_flops(self, tokens: float, head_rows: float | None = None) -> float:
        """Model FLOPs of one forward pass over ``tokens`` tokens, the LM head run on ``head_rows`` of them (None:
        every token); 2 FLOPs (a multiply and an add) per matmul weight per row:

            2 · L · (4·d² + 2·d·f) · tokens     q, k, v, dense (d × d each), fc1 (d × f), fc2 (f × d)
          + 2 · V · d · head_rows              the LM head

        Attention's scores and mixing (about 4·L·d·context per token, which depends on the mask), biases, norms,
        activations and the embedding lookup are left out. A backward pass costs twice the forward, so a training
        step of the policy is 3× this, plus 1× for a reference model's forward; MFU = that / time / peak FLOP/s."""
        d, f, V, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        rows = tokens if head_rows is None else head_rows
        return 2.0 * L * (4 * d * d + 2 * d * f) * tokens + 2.0 * V * d * rows

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json content: transformers' PhiConfig keys plus ours."""
        return {
            "model_type": "phi",
            "architectures": ["PhiForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta,
                                "partial_rotary_factor": self.partial_rotary_factor},
            "layer_norm_eps": self.layer_norm_eps,
            "qk_layernorm": self.qk_layernorm,
            "hidden_act": self.hidden_act,
            "tie_word_embeddings": False,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0,
            "hermesflow": {"attn_backend": self.attn_backend, **self.extra},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> ModelConfig:
        """Ours / HF Phi / Show-o's wrapper config (a Show-o config names no Phi sizes: phi-1.5's are used).

        Read as transformers' ``PhiConfig`` reads them: ``"num_key_value_heads": null`` (what microsoft/phi-1_5
        publishes) means one key/value head per attention head. Refused: grouped-query attention, tied embeddings,
        RoPE scaling (``rope_scaling``, or a ``rope_parameters.rope_type`` other than ``default``) and a null for any
        size this config holds, each a ``ValueError`` naming ``where`` and the key."""
        d = dict(d)
        if d.get("model_type") not in (None, "phi") and "llm_model_path" not in d:
            raise ValueError(f"{where}: model_type {d.get('model_type')!r} is not a Phi model")
        heads = d.get("num_attention_heads", cls.num_attention_heads)
        kv_heads = d.get("num_key_value_heads")
        if kv_heads is not None and kv_heads != heads:
            raise ValueError(f"{where}: grouped-query attention (num_key_value_heads {kv_heads} != "
                             f"num_attention_heads {heads}) is not part of the Phi/Show-o architecture")
        if d.get("tie_word_embeddings"):
            raise ValueError(f"{where}: tie_word_embeddings=True; Show-o's LM head is untied")
        rope = d.get("rope_parameters") or {}
        if d.get("rope_scaling") is not None or rope.get("rope_type", "default") != "default":
            scaling = d.get("rope_scaling") if d.get("rope_scaling") is not None else rope
            raise ValueError(f"{where}: RoPE scaling {scaling!r} is not supported; Show-o's Phi uses the default "
                             "rotary embedding (rope_scaling null)")
        kw: dict[str, Any] = {}
        names = {f.name for f in fields(cls)} - {"extra", "attn_backend"}
        for name in sorted(names):
            if name in d:
                if d[name] is None:
                    raise ValueError(f"{where}: {name} is null; it must be a value")
                kw[name] = d[name]
        for name in ("rope_theta", "partial_rotary_factor"):
            if rope.get(name) is not None:
                kw[name] = rope[name]
        ours = d.get("hermesflow") or {}
        if "attn_backend" in ours:
            kw["attn_backend"] = ours["attn_backend"]
        kw["extra"] = {k: v for k, v in ours.items() if k != "attn_backend"}
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
