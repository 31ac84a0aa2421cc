"""openai-whisper's Whisper (`whisper.model`, 20250625) in Paddle: a log-mel encoder (two
convolutions, fixed sinusoidal positions, pre-norm attention blocks) and a token decoder
(learned positions, causal self-attention, cross-attention to the audio, logits tied to the
token embedding). Module and tensor names are the reference's, so no weight rule renames
anything; paddle.nn.Linear stores [in, out], transposed by type.

The model returns its logits and, given labels, the next-token cross-entropy that trains it
(the reference builder in reference/audio.py computes the same), so that backward runs from
a loss. No key-value cache: alignment runs whole sequences."""

from __future__ import annotations

import math
from dataclasses import dataclass

import paddle
import paddle.nn.functional as F
from paddle import nn

from ports.common import PortConfig, causal_lm_loss


@dataclass
class ModelDimensions(PortConfig):
    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int


@dataclass
class WhisperOutput:
    logits: paddle.Tensor
    loss: paddle.Tensor | None = None


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> paddle.Tensor:
    """The encoder's fixed positions: sines then cosines of geometric timescales."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = paddle.exp(-increment * paddle.arange(channels // 2, dtype="float32"))
    scaled_time = paddle.arange(length, dtype="float32").unsqueeze(1) * inv_timescales.unsqueeze(0)
    return paddle.concat([paddle.sin(scaled_time), paddle.cos(scaled_time)], axis=1)


class MultiHeadAttention(nn.Layer):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        # the reference scales q and k by head ** -0.25 each; one head ** -0.5 is the same product
        self.scale = (n_state // n_head) ** -0.5
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias_attr=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x, xa=None, mask=None):
        source = x if xa is None else xa
        q, k, v = self.query(x), self.key(source), self.value(source)
        B, T, C = q.shape
        head = C // self.n_head

        def heads(t):
            return t.reshape([t.shape[0], t.shape[1], self.n_head, head]).transpose([0, 2, 1, 3])

        scores = paddle.matmul(heads(q), heads(k), transpose_y=True) * self.scale
        if mask is not None:
            scores = scores + mask[:T, :T]
        weights = F.softmax(scores, axis=-1)
        return self.out(paddle.matmul(weights, heads(v)).transpose([0, 2, 1, 3]).reshape([B, T, C]))


class ResidualAttentionBlock(nn.Layer):
    def __init__(self, n_state: int, n_head: int, cross_attention: bool = False):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head) if cross_attention else None
        self.cross_attn_ln = nn.LayerNorm(n_state) if cross_attention else None
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = nn.LayerNorm(n_state)

    def forward(self, x, xa=None, mask=None):
        x = x + self.attn(self.attn_ln(x), mask=mask)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_attn_ln(x), xa)
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Layer):
    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.conv1 = nn.Conv1D(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1D(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(n_ctx, n_state))
        self.blocks = nn.LayerList([ResidualAttentionBlock(n_state, n_head) for _ in range(n_layer)])
        self.ln_post = nn.LayerNorm(n_state)

    def forward(self, x):
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x)).transpose([0, 2, 1])
        x = x + self.positional_embedding
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


class TextDecoder(nn.Layer):
    def __init__(self, n_vocab: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.token_embedding = nn.Embedding(n_vocab, n_state)
        self.positional_embedding = self.create_parameter([n_ctx, n_state])
        self.blocks = nn.LayerList([ResidualAttentionBlock(n_state, n_head, cross_attention=True)
                                    for _ in range(n_layer)])
        self.ln = nn.LayerNorm(n_state)
        self.register_buffer("mask", paddle.triu(paddle.full([n_ctx, n_ctx], float("-inf")), 1), persistable=False)

    def forward(self, x, xa):
        x = self.token_embedding(x) + self.positional_embedding[: x.shape[-1]]
        for block in self.blocks:
            x = block(x, xa, mask=self.mask)
        return paddle.matmul(self.ln(x), self.token_embedding.weight, transpose_y=True)


class Whisper(nn.Layer):
    def __init__(self, dims: ModelDimensions):
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head,
                                    dims.n_audio_layer)
        self.decoder = TextDecoder(dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head,
                                   dims.n_text_layer)

    def forward(self, mel, tokens, labels=None):
        logits = self.decoder(tokens, self.encoder(mel))
        if labels is None:
            return WhisperOutput(logits)
        return WhisperOutput(logits, causal_lm_loss(logits, labels))


__all__ = ["ModelDimensions", "Whisper", "WhisperOutput", "sinusoids"]
