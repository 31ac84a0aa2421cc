"""Torch semantics that Paddle spells differently, shared by the hand ports.

Each helper closes one silent difference between the frameworks; the ports stay single
files for everything that is model-specific.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

IGNORE_INDEX = -100


class PortConfig:
    """Base of a port's config dataclass: built from a transformers config's values, taking
    the fields the port declares and leaving the rest (transformers bookkeeping) behind."""

    @classmethod
    def from_dict(cls, values: dict):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class BaseModelOutput:
    last_hidden_state: paddle.Tensor


@dataclass
class LMOutput:
    """A language-model head's result, named as transformers names it: loss and logits."""

    loss: paddle.Tensor | None
    logits: paddle.Tensor


CausalLMOutput = MaskedLMOutput = LMOutput


class TorchEmbedding(nn.Embedding):
    """nn.Embedding with torch's padding_idx semantics.

    paddle's own padding_idx returns zeros for that row; torch returns the stored row and
    only withholds its gradient. So padding_idx is not handed to paddle, and the gradient of
    the pad positions is cut instead.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__(num_embeddings, embedding_dim)
        self.padding_idx_torch = padding_idx

    def forward(self, input_ids):
        rows = F.embedding(input_ids, self.weight)
        if self.padding_idx_torch is None:
            return rows
        return paddle.where((input_ids == self.padding_idx_torch).unsqueeze(-1), rows.detach(), rows)


def log_softmax(logits):
    """log_softmax over the last axis, as torch's. Paddle 3.3.1's CPU F.log_softmax takes time
    quadratic in the axis length (141 s for 32 rows of 256,000 classes, against 0.07 s for
    logsumexp), and its float32 sum over a long axis drifts: 4.3e-4 from float64 at 256k
    classes, where torch's stays at 1.3e-5; so does the sum its backward takes. So: shifted
    by the (constant) row max, then in float64, forward and backward."""
    wide = (logits - logits.max(axis=-1, keepdim=True).detach()).astype("float64")
    return (wide - paddle.log(paddle.exp(wide).sum(axis=-1, keepdim=True))).astype(logits.dtype)


def cross_entropy_ignoring(logits, labels):
    """Mean token cross-entropy over the labels that are not IGNORE_INDEX, in fp32.

    paddle's cross_entropy(ignore_index=-100, reduction="mean") divides by ALL tokens (it
    honours ignore_index only when it is >= 0), so the mean is taken by hand.
    """
    valid = labels != IGNORE_INDEX
    logp = log_softmax(logits.astype("float32"))
    safe = paddle.where(valid, labels, paddle.zeros_like(labels))
    nll = -paddle.take_along_axis(logp, safe.unsqueeze(-1), axis=-1).squeeze(-1)
    weight = valid.astype("float32")  # paddle does not promote bool * float
    return (nll * weight).sum() / weight.sum()


def causal_lm_loss(logits, labels):
    """Next-token loss: position t predicts label t + 1; the last position predicts nothing."""
    B = labels.shape[0]
    shifted = paddle.concat([labels[:, 1:], paddle.full([B, 1], IGNORE_INDEX, dtype=labels.dtype)], axis=1)
    return cross_entropy_ignoring(logits, shifted)


def rotate_half(x):
    x1, x2 = x.chunk(2, axis=-1)
    return paddle.concat([-x2, x1], axis=-1)


def additive_mask(allowed, dtype):
    """transformers' eager mask from a boolean (B, 1, T, T): 0 where allowed, finfo.min elsewhere."""
    low = paddle.full([], paddle.finfo(dtype).min, dtype=dtype)
    return paddle.where(allowed, paddle.zeros([], dtype=dtype), low)


def key_padding(attention_mask, seq_len: int):
    """(B, 1, 1, T) booleans: which keys are real tokens (all of them without a mask)."""
    if attention_mask is None:
        return paddle.ones([1, 1, 1, seq_len], dtype="bool")
    return attention_mask.astype("bool")[:, None, None, :]


def positions(seq_len: int):
    """Query and key indices, (T, 1) and (1, T)."""
    return paddle.arange(seq_len).unsqueeze(1), paddle.arange(seq_len).unsqueeze(0)
