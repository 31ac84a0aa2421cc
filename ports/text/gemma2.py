"""Gemma2ForCausalLM in Paddle.

Reference: transformers 5.23.0, src/transformers/models/gemma2/modeling_gemma2.py
(generated from modular_gemma2.py). Module names follow the reference one to one
(`model.layers.0.self_attn.q_proj`, ...), so weights and layers pair by name.

Deliberate differences from the reference:
- Eager attention only, no KV cache and no generation: this port exists to be verified.
- `paddle.nn.Linear` stores weights as [in, out]; the weight rules transpose them.
- `lm_head` is a `paddle.compat.nn.Linear` ([out, in], as torch) so that it can share the
  embedding matrix when embeddings are tied, exactly as the reference does.
- Masks are built here in `Gemma2Model.forward`, as additive float masks equal to
  transformers' eager masks (0 where allowed, finfo.min where masked).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ports.common import (
    BaseModelOutput,
    CausalLMOutput,
    PortConfig,
    TorchEmbedding,
    additive_mask,
    causal_lm_loss,
    key_padding,
    positions,
    rotate_half,
)


@dataclass
class Gemma2Config(PortConfig):
    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = 0
    tie_word_embeddings: bool = True
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    sliding_window: int = 4096
    layer_types: list[str] | None = None
    final_logit_softcapping: float | None = 30.0
    attn_logit_softcapping: float | None = 50.0

    def __post_init__(self):
        if self.layer_types is None:
            # Gemma2 alternates, starting with a sliding layer.
            self.layer_types = [
                "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(self.num_hidden_layers)
            ]


class Gemma2RMSNorm(nn.Layer):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = self.create_parameter([dim], default_initializer=nn.initializer.Constant(0.0))

    def forward(self, x):
        # Gemma2 normalises in fp32 and scales by (1 + weight) before casting back
        # (transformers PR #29402); the weight is stored zero-centred.
        h = x.astype("float32")
        h = h * paddle.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = h * (1.0 + self.weight.astype("float32"))
        return h.astype(x.dtype)


class Gemma2MLP(nn.Layer):
    def __init__(self, config: Gemma2Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias_attr=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias_attr=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias_attr=False)
        if config.hidden_activation != "gelu_pytorch_tanh":
            raise ValueError(f"unsupported hidden_activation {config.hidden_activation!r}")
        self.act_fn = nn.GELU(approximate=True)

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Gemma2RotaryEmbedding(nn.Layer):
    def __init__(self, config: Gemma2Config):
        super().__init__()
        if config.rope_parameters.get("rope_type", "default") != "default":
            raise ValueError(f"unsupported rope_type {config.rope_parameters['rope_type']!r}")
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (paddle.arange(0, dim, 2, dtype="float32") / dim))
        # Kept in fp32 whatever the model dtype, like the reference's buffer.
        self.register_buffer("inv_freq", inv_freq, persistable=False)

    @paddle.no_grad()
    def forward(self, x, position_ids):
        freqs = position_ids[..., None].astype("float32") * self.inv_freq  # (B, T, hd/2)
        emb = paddle.concat([freqs, freqs], axis=-1)  # (B, T, hd)
        return emb.cos().astype(x.dtype), emb.sin().astype(x.dtype)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd), broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class Gemma2Attention(nn.Layer):
    def __init__(self, config: Gemma2Config, layer_idx: int):
        super().__init__()
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        # Gemma2 scales scores by query_pre_attn_scalar, not by head_dim.
        self.scaling = config.query_pre_attn_scalar**-0.5
        self.softcap = config.attn_logit_softcapping
        bias = None if config.attention_bias else False
        h, nh, nkv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(h, nh * hd, bias_attr=bias)
        self.k_proj = nn.Linear(h, nkv * hd, bias_attr=bias)
        self.v_proj = nn.Linear(h, nkv * hd, bias_attr=bias)
        self.o_proj = nn.Linear(nh * hd, h, bias_attr=bias)

    def forward(self, hidden_states, position_embeddings, attention_mask=None):
        B, T = hidden_states.shape[:2]
        q = self.q_proj(hidden_states).reshape([B, T, -1, self.head_dim]).transpose([0, 2, 1, 3])  # (B, nh, T, hd)
        k = self.k_proj(hidden_states).reshape([B, T, -1, self.head_dim]).transpose([0, 2, 1, 3])  # (B, nkv, T, hd)
        v = self.v_proj(hidden_states).reshape([B, T, -1, self.head_dim]).transpose([0, 2, 1, 3])
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        # GQA: each KV head serves num_key_value_groups consecutive query heads.
        k = paddle.repeat_interleave(k, self.num_key_value_groups, axis=1)  # (B, nh, T, hd)
        v = paddle.repeat_interleave(v, self.num_key_value_groups, axis=1)

        scores = paddle.matmul(q, k, transpose_y=True) * self.scaling  # (B, nh, T, T)
        if self.softcap is not None:
            # Soft-capping happens before the mask, as in the reference.
            scores = paddle.tanh(scores / self.softcap) * self.softcap
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = F.softmax(scores.astype("float32"), axis=-1).astype(q.dtype)
        out = paddle.matmul(weights, v).transpose([0, 2, 1, 3]).reshape([B, T, -1])  # (B, T, nh*hd)
        return self.o_proj(out), weights


class Gemma2DecoderLayer(nn.Layer):
    def __init__(self, config: Gemma2Config, layer_idx: int):
        super().__init__()
        self.self_attn = Gemma2Attention(config, layer_idx)
        self.mlp = Gemma2MLP(config)
        eps = config.rms_norm_eps
        self.input_layernorm = Gemma2RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = Gemma2RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = Gemma2RMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = Gemma2RMSNorm(config.hidden_size, eps)

    def forward(self, hidden_states, position_embeddings, attention_mask=None):
        # Gemma2 normalises both before and after each sub-block ("sandwich" norms).
        residual = hidden_states
        h, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask)
        hidden_states = residual + self.post_attention_layernorm(h)
        residual = hidden_states
        h = self.mlp(self.pre_feedforward_layernorm(hidden_states))
        return residual + self.post_feedforward_layernorm(h)


class Gemma2TextScaledWordEmbedding(TorchEmbedding):
    """Embedding lookup scaled by sqrt(hidden_size), with torch's padding_idx semantics."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, embed_scale: float):
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.register_buffer("embed_scale", paddle.to_tensor(embed_scale, dtype="float32"), persistable=False)

    def forward(self, input_ids):
        # The scale is cast to the weight dtype first (in bf16, sqrt(3072) becomes 55.5), as the reference does.
        return super().forward(input_ids) * self.embed_scale.astype(self.weight.dtype)


def _additive_masks(attention_mask, seq_len: int, sliding_window: int, dtype) -> dict:
    """transformers' eager masks per layer type, (B, 1, T, T)."""
    q, kv = positions(seq_len)
    causal = kv <= q
    # A sliding layer sees the current token and the sliding_window - 1 before it.
    window = causal & (kv > q - sliding_window)
    keys = key_padding(attention_mask, seq_len)
    return {
        "full_attention": additive_mask(causal[None, None] & keys, dtype),
        "sliding_attention": additive_mask(window[None, None] & keys, dtype),
    }


class Gemma2Model(nn.Layer):
    def __init__(self, config: Gemma2Config):
        super().__init__()
        self.config = config
        self.embed_tokens = Gemma2TextScaledWordEmbedding(
            config.vocab_size, config.hidden_size, config.pad_token_id, embed_scale=config.hidden_size**0.5
        )
        self.layers = nn.LayerList([Gemma2DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Gemma2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Gemma2RotaryEmbedding(config)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        hidden_states = self.embed_tokens(input_ids)  # (B, T, h)
        T = input_ids.shape[1]
        if position_ids is None:
            position_ids = paddle.arange(T, dtype="int64").unsqueeze(0)  # (1, T)
        masks = _additive_masks(attention_mask, T, self.config.sliding_window, hidden_states.dtype)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer, layer_type in zip(self.layers, self.config.layer_types):
            hidden_states = layer(hidden_states, position_embeddings, masks[layer_type])
        return BaseModelOutput(last_hidden_state=self.norm(hidden_states))


class Gemma2ForCausalLM(nn.Layer):
    def __init__(self, config: Gemma2Config):
        super().__init__()
        self.config = config
        self.model = Gemma2Model(config)
        self.lm_head = paddle.compat.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, attention_mask=None, labels=None):
        hidden_states = self.model(input_ids, attention_mask).last_hidden_state
        logits = self.lm_head(hidden_states)  # (B, T, V)
        if self.config.final_logit_softcapping is not None:
            cap = self.config.final_logit_softcapping
            logits = paddle.tanh(logits / cap) * cap
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(loss=loss, logits=logits)


__all__ = ["Gemma2Config", "Gemma2ForCausalLM", "Gemma2Model", "causal_lm_loss"]
