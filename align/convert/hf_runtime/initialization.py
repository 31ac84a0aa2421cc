"""In-place initialisers with torch.nn.init's names (HF's `initialization as init`)."""

from __future__ import annotations

import numpy as np
import paddle


def _set(t: paddle.Tensor, value) -> paddle.Tensor:
    with paddle.no_grad():
        t.set_value(paddle.to_tensor(value, dtype=t.dtype) if not isinstance(value, paddle.Tensor)
                    else value.astype(t.dtype))
    return t


def zeros_(t):
    return _set(t, paddle.zeros(t.shape, dtype=t.dtype))


def ones_(t):
    return _set(t, paddle.ones(t.shape, dtype=t.dtype))


def constant_(t, value):
    return _set(t, paddle.full(t.shape, value, dtype=t.dtype))


def copy_(t, source):
    return _set(t, source)


def normal_(t, mean: float = 0.0, std: float = 1.0):
    return _set(t, paddle.normal(mean, std, t.shape).astype(t.dtype))


def trunc_normal_(t, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0):
    # Resample outside [a, b], as torch's truncation does in effect.
    values = paddle.normal(mean, std, t.shape).numpy()
    bad = (values < a) | (values > b)
    while bad.any():
        values[bad] = paddle.normal(mean, std, [int(bad.sum())]).numpy()
        bad = (values < a) | (values > b)
    return _set(t, values.astype(np.float32))


def uniform_(t, a: float = 0.0, b: float = 1.0):
    return _set(t, paddle.uniform(t.shape, min=a, max=b).astype(t.dtype))
