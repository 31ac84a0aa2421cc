"""ModernBertForMaskedLM in Paddle.

Reference: transformers 5.23.0, src/transformers/models/modernbert/modeling_modernbert.py
(generated from modular_modernbert.py), its eager (padded) path. Module names follow the
reference one to one (`model.layers.0.attn.Wqkv`, `mlp.Wi`, `head.dense`, `decoder`).

Deliberate differences from the reference:
- Eager attention on padded batches only. The reference's unpadded (flash-attention) path
  is not part of transformers 5.23's eager model, so there is nothing unpadded to compare.
- `paddle.nn.Linear` stores weights as [in, out]; the weight rules transpose them. The
  decoder is a `paddle.compat.nn.Linear` ([out, in], as torch) sharing the token embedding,
  as the reference ties them.
- No sparse prediction (the reference's default, sparse_prediction=False).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ports.common import (
    BaseModelOutput,
    MaskedLMOutput,
    PortConfig,
    TorchEmbedding,
    additive_mask,
    cross_entropy_ignoring,
    key_padding,
    positions,
    rotate_half,
)

# ACT2FN["gelu"] is exact GELU in transformers.
ACTIVATIONS = {"gelu": lambda: nn.GELU(approximate=False), "gelu_pytorch_tanh": lambda: nn.GELU(approximate=True),
               "silu": nn.Silu}


@dataclass
class ModernBertConfig(PortConfig):
    vocab_size: int = 50368
    hidden_size: int = 768
    intermediate_size: int = 1152
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    hidden_activation: str = "gelu"
    classifier_activation: str = "gelu"
    norm_eps: float = 1e-5
    norm_bias: bool = False
    pad_token_id: int | None = 50283
    layer_types: list[str] = field(default_factory=list)
    rope_parameters: dict = field(default_factory=dict)
    local_attention: int = 128
    attention_bias: bool = False
    mlp_bias: bool = False
    classifier_bias: bool = False
    decoder_bias: bool = True
    tie_word_embeddings: bool = True
    attention_dropout: float = 0.0
    mlp_dropout: float = 0.0
    embedding_dropout: float = 0.0


def _layer_norm(config: ModernBertConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, epsilon=config.norm_eps, bias_attr=None if config.norm_bias else False)


def _dropout(p: float) -> nn.Layer:
    return nn.Dropout(p) if p > 0.0 else nn.Identity()


class ModernBertEmbeddings(nn.Layer):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.tok_embeddings = TorchEmbedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.norm = _layer_norm(config)
        self.drop = nn.Dropout(config.embedding_dropout)

    def forward(self, input_ids):
        return self.drop(self.norm(self.tok_embeddings(input_ids)))


class ModernBertMLP(nn.Layer):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        bias = None if config.mlp_bias else False
        self.Wi = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias_attr=bias)
        self.act = ACTIVATIONS[config.hidden_activation]()
        self.drop = nn.Dropout(config.mlp_dropout)
        self.Wo = nn.Linear(config.intermediate_size, config.hidden_size, bias_attr=bias)

    def forward(self, hidden_states):
        # GeGLU: Wi is fused as [input | gate] and the activation goes on the INPUT half.
        x, gate = self.Wi(hidden_states).chunk(2, axis=-1)
        return self.Wo(self.drop(self.act(x) * gate))


class ModernBertRotaryEmbedding(nn.Layer):
    """One inverse-frequency table per attention type: global and local layers use different thetas."""

    def __init__(self, config: ModernBertConfig):
        super().__init__()
        dim = config.hidden_size // config.num_attention_heads
        for layer_type in sorted(set(config.layer_types)):
            rope = config.rope_parameters[layer_type]
            if rope.get("rope_type", "default") != "default":
                raise ValueError(f"unsupported rope_type {rope['rope_type']!r}")
            inv_freq = 1.0 / (rope["rope_theta"] ** (paddle.arange(0, dim, 2, dtype="float32") / dim))
            self.register_buffer(f"{layer_type}_inv_freq", inv_freq, persistable=False)

    @paddle.no_grad()
    def forward(self, x, position_ids, layer_type):
        freqs = position_ids[..., None].astype("float32") * getattr(self, f"{layer_type}_inv_freq")  # (B, T, hd/2)
        emb = paddle.concat([freqs, freqs], axis=-1)
        return emb.cos().astype(x.dtype), emb.sin().astype(x.dtype)


def apply_rotary_pos_emb(q, k, cos, sin):
    # The reference rotates in fp32 whatever the model dtype.
    dtype = q.dtype
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd)
    q, k = q.astype("float32"), k.astype("float32")
    return (q * cos + rotate_half(q) * sin).astype(dtype), (k * cos + rotate_half(k) * sin).astype(dtype)


class ModernBertAttention(nn.Layer):
    def __init__(self, config: ModernBertConfig, layer_idx: int):
        super().__init__()
        self.head_dim = config.hidden_size // config.num_attention_heads
        bias = None if config.attention_bias else False
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias_attr=bias)
        self.Wo = nn.Linear(config.hidden_size, config.hidden_size, bias_attr=bias)
        self.out_drop = _dropout(config.attention_dropout)

    def forward(self, hidden_states, position_embeddings, attention_mask=None):
        B, T = hidden_states.shape[:2]
        # Fused as [q | k | v], each (nh * hd).
        qkv = self.Wqkv(hidden_states).reshape([B, T, 3, -1, self.head_dim])
        q, k, v = (qkv[:, :, i].transpose([0, 2, 1, 3]) for i in range(3))  # (B, nh, T, hd)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        scores = paddle.matmul(q, k, transpose_y=True) * self.head_dim**-0.5  # (B, nh, T, T)
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = F.softmax(scores.astype("float32"), axis=-1).astype(q.dtype)
        out = paddle.matmul(weights, v).transpose([0, 2, 1, 3]).reshape([B, T, -1])
        return self.out_drop(self.Wo(out)), weights


class ModernBertEncoderLayer(nn.Layer):
    def __init__(self, config: ModernBertConfig, layer_idx: int):
        super().__init__()
        # The first layer has no attention norm: the embeddings were just normalised.
        self.attn_norm = nn.Identity() if layer_idx == 0 else _layer_norm(config)
        self.attn = ModernBertAttention(config, layer_idx)
        self.mlp_norm = _layer_norm(config)
        self.mlp = ModernBertMLP(config)
        self.attention_type = config.layer_types[layer_idx]

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None):
        h, _ = self.attn(self.attn_norm(hidden_states), position_embeddings, attention_mask)
        hidden_states = hidden_states + h
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


def _bidirectional_masks(attention_mask, seq_len: int, local_attention: int, dtype) -> dict:
    """Encoder masks per layer type, (B, 1, T, T): every real key is visible to every query,
    or, in local layers, only keys within local_attention // 2 positions on either side."""
    q, kv = positions(seq_len)
    keys = key_padding(attention_mask, seq_len)
    near = (q - kv).abs() <= local_attention // 2
    return {
        "full_attention": additive_mask(keys.expand([-1, 1, seq_len, seq_len]), dtype),
        "sliding_attention": additive_mask(near[None, None] & keys, dtype),
    }


class ModernBertModel(nn.Layer):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.config = config
        self.embeddings = ModernBertEmbeddings(config)
        self.layers = nn.LayerList([ModernBertEncoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.final_norm = _layer_norm(config)
        self.rotary_emb = ModernBertRotaryEmbedding(config)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        T = input_ids.shape[1]
        if position_ids is None:
            position_ids = paddle.arange(T, dtype="int64").unsqueeze(0)
        hidden_states = self.embeddings(input_ids)  # (B, T, h)
        masks = _bidirectional_masks(attention_mask, T, self.config.local_attention, hidden_states.dtype)
        # Same iteration as the reference (a set), so that the n-th rotary call pairs with its n-th.
        position_embeddings = {t: self.rotary_emb(hidden_states, position_ids, t) for t in set(self.config.layer_types)}
        for layer in self.layers:
            hidden_states = layer(hidden_states, masks[layer.attention_type], position_embeddings[layer.attention_type])
        return BaseModelOutput(last_hidden_state=self.final_norm(hidden_states))


class ModernBertPredictionHead(nn.Layer):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size,
                               bias_attr=None if config.classifier_bias else False)
        self.act = ACTIVATIONS[config.classifier_activation]()
        self.norm = _layer_norm(config)

    def forward(self, hidden_states):
        return self.norm(self.act(self.dense(hidden_states)))


class ModernBertForMaskedLM(nn.Layer):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.config = config
        self.model = ModernBertModel(config)
        self.head = ModernBertPredictionHead(config)
        self.decoder = paddle.compat.nn.Linear(config.hidden_size, config.vocab_size, bias=config.decoder_bias)
        if config.tie_word_embeddings:
            self.decoder.weight = self.model.embeddings.tok_embeddings.weight

    def forward(self, input_ids, attention_mask=None, labels=None):
        last_hidden_state = self.model(input_ids, attention_mask).last_hidden_state
        logits = self.decoder(self.head(last_hidden_state))  # (B, T, V)
        loss = cross_entropy_ignoring(logits, labels) if labels is not None else None
        return MaskedLMOutput(loss=loss, logits=logits)
