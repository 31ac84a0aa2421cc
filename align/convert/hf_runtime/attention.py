"""The attention-function registry HF modeling files call through:
`ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)`.

"eager" (or no choice) is the modeling file's own `eager_attention_forward`, passed in as the
default; "sdpa" is Paddle's scaled_dot_product_attention with torch's [B, H, S, D] layout.
"""

from __future__ import annotations

from collections.abc import Callable

import paddle


def _repeat_kv(x: paddle.Tensor, n_rep: int) -> paddle.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand([b, h, n_rep, s, d]).reshape([b, h * n_rep, s, d])


def sdpa_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """(attn_output [B, S, H, D], None), as HF's sdpa_attention_forward returns."""
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("sdpa cannot soft-cap attention logits; use eager")
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    if is_causal is None:
        is_causal = attention_mask is None and query.shape[2] > 1 and getattr(module, "is_causal", True)
    out = paddle.compat.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling)
    return out.transpose([0, 2, 1, 3]), None


class AttentionInterface:
    """Implementation name -> attention function; unknown names are refused, not guessed."""

    def __init__(self):
        self._functions: dict[str, Callable] = {"sdpa": sdpa_attention_forward}

    def register(self, name: str, fn: Callable) -> None:
        self._functions[name] = fn

    def __getitem__(self, name: str) -> Callable:
        return self._functions[name]

    def __contains__(self, name: object) -> bool:
        return name in self._functions

    def get_interface(self, implementation: str | None, default: Callable) -> Callable:
        if implementation in (None, "eager"):
            return default
        if implementation not in self._functions:
            raise NotImplementedError(f"attention implementation {implementation!r} is not in align's runtime "
                                      f"(known: eager, {', '.join(sorted(self._functions))})")
        return self._functions[implementation]


ALL_ATTENTION_FUNCTIONS = AttentionInterface()
