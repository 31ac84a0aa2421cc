"""Attention masks, as HF's masking utilities build them for eager and sdpa attention.

A mask is decided per (batch, query, key) position by a predicate, then combined with the
2D padding mask (a key that is padding is never attended). Eager attention adds the mask:
0 where attended, the dtype's most negative finite value elsewhere (a fully masked row then
softmaxes to a uniform row, exactly as in torch). Sdpa takes the boolean mask itself.
Patterns (query position q, key position k):
- causal: k <= q
- sliding-window causal: k <= q and k > q - window
- bidirectional: every k
- sliding-window bidirectional: |q - k| <= window
"""

from __future__ import annotations

import paddle

from align.convert.hf_runtime.dtypes import promote


def _implementation(config) -> str:
    return getattr(config, "_attn_implementation", None) or "eager"


def _build(config, inputs_embeds, attention_mask, allowed, skip_if_unpadded: bool):
    """allowed(q, k) -> bool [Q, K]; returns the eager float mask or the sdpa bool mask
    [B, 1, Q, K], or None where HF returns None (nothing to mask)."""
    if attention_mask is not None and attention_mask.ndim == 4:
        return attention_mask  # already prepared: HF passes it through as is
    batch, q_len = inputs_embeds.shape[0], inputs_embeds.shape[1]
    kv_len = attention_mask.shape[-1] if attention_mask is not None else q_len
    padded = attention_mask is not None and not bool(attention_mask.astype("bool").all())
    if skip_if_unpadded and not padded:
        return None
    q = paddle.arange(q_len, dtype="int64").unsqueeze(-1)
    k = paddle.arange(kv_len, dtype="int64").unsqueeze(0)
    mask = allowed(q, k).unsqueeze(0).unsqueeze(0).expand([batch, 1, q_len, kv_len])
    if attention_mask is not None:
        keys = attention_mask.astype("bool")[:, None, None, :]  # [B, 1, 1, K]: real tokens
        mask = paddle.logical_and(mask, keys.expand([batch, 1, q_len, kv_len]))
    if _implementation(config) == "sdpa":
        return mask
    dtype = inputs_embeds.dtype
    zero = paddle.zeros([], dtype=dtype)
    lowest = paddle.full([], paddle.finfo(dtype).min, dtype=dtype)
    return paddle.where(mask, zero, lowest)


def create_causal_mask(config, inputs_embeds, attention_mask, past_key_values=None, position_ids=None, **kwargs):
    if kwargs.get("or_mask_function") or kwargs.get("and_mask_function") or kwargs.get("block_sequence_ids") is not None:
        raise NotImplementedError("custom mask functions are not supported by align's runtime")
    if past_key_values is not None:
        raise NotImplementedError("masks over a KV cache are not supported by align's runtime")
    if not getattr(config, "is_causal", True):
        return create_bidirectional_mask(config, inputs_embeds, attention_mask)
    return _build(config, inputs_embeds, attention_mask, lambda q, k: k <= q, skip_if_unpadded=False)


def create_sliding_window_causal_mask(config, inputs_embeds, attention_mask, past_key_values=None,
                                      position_ids=None, **kwargs):
    if not getattr(config, "is_causal", True):
        return create_bidirectional_sliding_window_mask(config, inputs_embeds, attention_mask)
    if past_key_values is not None:
        raise NotImplementedError("masks over a KV cache are not supported by align's runtime")
    window = getattr(config, "sliding_window", None)
    if window is None:
        raise ValueError("the config has no sliding_window")
    return _build(config, inputs_embeds, attention_mask,
                  lambda q, k: paddle.logical_and(k <= q, k > q - window), skip_if_unpadded=False)


def create_bidirectional_mask(config, inputs_embeds, attention_mask, encoder_hidden_states=None, **kwargs):
    if encoder_hidden_states is not None:
        raise NotImplementedError("cross-attention masks are not supported by align's runtime")
    return _build(config, inputs_embeds, attention_mask, lambda q, k: paddle.ones_like(q + k, dtype="bool"),
                  skip_if_unpadded=True)


def create_bidirectional_sliding_window_mask(config, inputs_embeds, attention_mask, **kwargs):
    window = getattr(config, "sliding_window", None)
    if window is None:
        raise ValueError("the config has no sliding_window")
    return _build(config, inputs_embeds, attention_mask, lambda q, k: paddle.abs(q - k) <= window,
                  skip_if_unpadded=False)


def padding_mask_to_additive(attention_mask: paddle.Tensor, dtype: str = "float32") -> paddle.Tensor:
    """A [B, K] 0/1 padding mask (int64, as tokenizers give it) -> [B, 1, 1, K] additive float mask.
    Torch code writes `(1 - mask) * min`, an int64 * float product Paddle refuses; promote
    computes it as torch does."""
    lowest = paddle.full([], paddle.finfo(dtype).min, dtype=dtype)
    one = paddle.ones([], dtype=attention_mask.dtype)
    inverted, lowest = promote(one - attention_mask, lowest)
    return (inverted * lowest)[:, None, None, :]
