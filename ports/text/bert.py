"""BertModel in Paddle.

Reference: transformers 5.23.0, src/transformers/models/bert/modeling_bert.py, the encoder
(no cross-attention, no cache), eager attention. Module names follow the reference one to one
(`encoder.layer.0.attention.self.query`, `pooler.dense`, ...).

Deliberate differences from the reference:
- Encoder only: no decoder mode, cross-attention or KV cache.
- `paddle.nn.Linear` stores weights as [in, out]; the weight rules transpose them.
"""

from __future__ import annotations

from dataclasses import dataclass

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ports.common import PortConfig, TorchEmbedding, additive_mask, key_padding

ACTIVATIONS = {"gelu": lambda: nn.GELU(approximate=False), "gelu_new": lambda: nn.GELU(approximate=True),
               "relu": nn.ReLU}


@dataclass
class BertConfig(PortConfig):
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0


@dataclass
class BaseModelOutputWithPooling:
    last_hidden_state: paddle.Tensor
    pooler_output: paddle.Tensor


@dataclass
class EncoderOutput:
    last_hidden_state: paddle.Tensor


class BertEmbeddings(nn.Layer):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = TorchEmbedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids=None, position_ids=None):
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = paddle.arange(T, dtype="int64").unsqueeze(0)  # (1, T)
        if token_type_ids is None:
            token_type_ids = paddle.zeros([B, T], dtype="int64")
        # Same order of additions as the reference: words + token types, then + positions.
        embeddings = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        embeddings = embeddings + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class BertSelfAttention(nn.Layer):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.scaling = self.attention_head_size**-0.5
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        # Held but never called in eager mode (the reference passes its p to the attention function).
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(self, hidden_states, attention_mask=None):
        B, T = hidden_states.shape[:2]

        def heads(x):
            return x.reshape([B, T, -1, self.attention_head_size]).transpose([0, 2, 1, 3])  # (B, nh, T, hd)

        q, k, v = heads(self.query(hidden_states)), heads(self.key(hidden_states)), heads(self.value(hidden_states))
        scores = paddle.matmul(q, k, transpose_y=True) * self.scaling  # (B, nh, T, T)
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = F.softmax(scores, axis=-1)
        out = paddle.matmul(weights, v).transpose([0, 2, 1, 3]).reshape([B, T, -1])  # (B, T, h)
        return out, weights


class BertSelfOutput(nn.Layer):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)  # post-norm residual


class BertAttention(nn.Layer):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states, attention_mask=None):
        out, weights = self.self(hidden_states, attention_mask)
        return self.output(out, hidden_states), weights


class BertIntermediate(nn.Layer):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACTIVATIONS[config.hidden_act]()

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class BertOutput(nn.Layer):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertLayer(nn.Layer):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None):
        if encoder_hidden_states is not None:
            raise NotImplementedError("cross-attention is not ported")
        attention_output, _ = self.attention(hidden_states, attention_mask)
        return self.output(self.intermediate(attention_output), attention_output)


class BertEncoder(nn.Layer):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.LayerList([BertLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states, attention_mask=None):
        for layer in self.layer:
            hidden_states = layer(hidden_states, attention_mask)
        return EncoderOutput(last_hidden_state=hidden_states)


class BertPooler(nn.Layer):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states):
        return self.activation(self.dense(hidden_states[:, 0]))  # the first ([CLS]) token


class BertModel(nn.Layer):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        hidden_states = self.embeddings(input_ids, token_type_ids)
        T = input_ids.shape[1]
        # Bidirectional: every query sees every real (non-padding) key.
        mask = additive_mask(key_padding(attention_mask, T).expand([-1, 1, T, T]), hidden_states.dtype)
        last = self.encoder(hidden_states, mask).last_hidden_state
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=self.pooler(last))
