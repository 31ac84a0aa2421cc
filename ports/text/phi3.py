"""Phi3ForCausalLM in Paddle.

Reference: transformers 5.23.0, src/transformers/models/phi3/modeling_phi3.py (generated
from modular_phi3.py). Module names follow the reference one to one, fused projections
included (`self_attn.qkv_proj`, `mlp.gate_up_proj`), so weights and layers pair by name.

Deliberate differences from the reference:
- Eager attention only, no KV cache and no generation.
- `paddle.nn.Linear` stores weights as [in, out]; the weight rules transpose them. The fused
  layouts are unchanged: qkv_proj's outputs are [q | k | v], gate_up_proj's are [gate | up].
- Default RoPE only (no longrope/su scaling), with partial_rotary_factor.
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

ACTIVATIONS = {"silu": nn.Silu, "gelu": nn.GELU}


@dataclass
class Phi3Config(PortConfig):
    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = 32000
    tie_word_embeddings: bool = False
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    sliding_window: int | None = None
    resid_pdrop: float = 0.0

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads


class Phi3RMSNorm(nn.Layer):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = self.create_parameter([hidden_size], default_initializer=nn.initializer.Constant(1.0))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        # Normalised in fp32, cast back, THEN scaled (Llama style; unlike Gemma's (1 + w) in fp32).
        h = hidden_states.astype("float32")
        h = h * paddle.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.astype(hidden_states.dtype)


class Phi3MLP(nn.Layer):
    def __init__(self, config: Phi3Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias_attr=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias_attr=False)
        self.activation_fn = ACTIVATIONS[config.hidden_act]()

    def forward(self, hidden_states):
        gate, up = self.gate_up_proj(hidden_states).chunk(2, axis=-1)  # fused as [gate | up]
        return self.down_proj(up * self.activation_fn(gate))


class Phi3RotaryEmbedding(nn.Layer):
    def __init__(self, config: Phi3Config):
        super().__init__()
        rope = config.rope_parameters
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"unsupported rope_type {rope['rope_type']!r}")
        # Only the first partial_rotary_factor of each head is rotated.
        dim = int(config.head_dim * rope.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (rope["rope_theta"] ** (paddle.arange(0, dim, 2, dtype="float32") / dim))
        self.register_buffer("inv_freq", inv_freq, persistable=False)

    @paddle.no_grad()
    def forward(self, x, position_ids):
        freqs = position_ids[..., None].astype("float32") * self.inv_freq  # (B, T, rot/2)
        emb = paddle.concat([freqs, freqs], axis=-1)  # (B, T, rot)
        return emb.cos().astype(x.dtype), emb.sin().astype(x.dtype)


def apply_rotary_pos_emb(q, k, cos, sin):
    """Rotate the first cos.shape[-1] dims of each head; pass the rest through."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, rot)
    rot = cos.shape[-1]
    q_rot, q_pass = q[..., :rot], q[..., rot:]
    k_rot, k_pass = k[..., :rot], k[..., rot:]
    q = paddle.concat([q_rot * cos + rotate_half(q_rot) * sin, q_pass], axis=-1)
    k = paddle.concat([k_rot * cos + rotate_half(k_rot) * sin, k_pass], axis=-1)
    return q, k


class Phi3Attention(nn.Layer):
    def __init__(self, config: Phi3Config, layer_idx: int):
        super().__init__()
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        op_size = (config.num_attention_heads + 2 * config.num_key_value_heads) * self.head_dim
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias_attr=False)
        self.qkv_proj = nn.Linear(config.hidden_size, op_size, bias_attr=False)

    def forward(self, hidden_states, position_embeddings, attention_mask=None):
        B, T = hidden_states.shape[:2]
        qkv = self.qkv_proj(hidden_states)  # (B, T, (nh + 2 nkv) hd), fused as [q | k | v]
        q_end = self.num_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        q = qkv[..., :q_end].reshape([B, T, -1, self.head_dim]).transpose([0, 2, 1, 3])  # (B, nh, T, hd)
        k = qkv[..., q_end:q_end + kv].reshape([B, T, -1, self.head_dim]).transpose([0, 2, 1, 3])  # (B, nkv, T, hd)
        v = qkv[..., q_end + kv:].reshape([B, T, -1, self.head_dim]).transpose([0, 2, 1, 3])
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        k = paddle.repeat_interleave(k, self.num_key_value_groups, axis=1)  # (B, nh, T, hd)
        v = paddle.repeat_interleave(v, self.num_key_value_groups, axis=1)
        scores = paddle.matmul(q, k, transpose_y=True) * self.scaling  # (B, nh, T, T)
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = F.softmax(scores.astype("float32"), axis=-1).astype(q.dtype)
        out = paddle.matmul(weights, v).transpose([0, 2, 1, 3]).reshape([B, T, -1])  # (B, T, nh*hd)
        return self.o_proj(out), weights


class Phi3DecoderLayer(nn.Layer):
    def __init__(self, config: Phi3Config, layer_idx: int):
        super().__init__()
        self.self_attn = Phi3Attention(config, layer_idx)
        self.mlp = Phi3MLP(config)
        self.input_layernorm = Phi3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Phi3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.resid_attn_dropout = nn.Dropout(config.resid_pdrop)
        self.resid_mlp_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states, position_embeddings, attention_mask=None):
        h, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask)
        hidden_states = hidden_states + self.resid_attn_dropout(h)
        h = self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states + self.resid_mlp_dropout(h)


class Phi3Model(nn.Layer):
    def __init__(self, config: Phi3Config):
        super().__init__()
        self.config = config
        self.embed_tokens = TorchEmbedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.LayerList([Phi3DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Phi3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Phi3RotaryEmbedding(config)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        hidden_states = self.embed_tokens(input_ids)  # (B, T, h)
        T = input_ids.shape[1]
        if position_ids is None:
            position_ids = paddle.arange(T, dtype="int64").unsqueeze(0)
        mask = _causal_mask(attention_mask, T, self.config.sliding_window, hidden_states.dtype)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, mask)
        return BaseModelOutput(last_hidden_state=self.norm(hidden_states))


def _causal_mask(attention_mask, seq_len: int, sliding_window: int | None, dtype):
    """Causal (and, when the config sets a window, sliding) additive mask, (B, 1, T, T)."""
    q, kv = positions(seq_len)
    allowed = kv <= q
    if sliding_window is not None:
        allowed = allowed & (kv > q - sliding_window)  # every layer slides in Phi3
    return additive_mask(allowed[None, None] & key_padding(attention_mask, seq_len), dtype)


class Phi3ForCausalLM(nn.Layer):
    def __init__(self, config: Phi3Config):
        super().__init__()
        self.config = config
        self.model = Phi3Model(config)
        if config.tie_word_embeddings:
            self.lm_head = paddle.compat.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.lm_head.weight = self.model.embed_tokens.weight
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias_attr=False)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.lm_head(self.model(input_ids, attention_mask).last_hidden_state)  # (B, T, V)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(loss=loss, logits=logits)
