"""Layers with torch's semantics and attribute names, for converted code.

Paddle's layers differ from torch's in ways converted code does not see:
- `paddle.nn.Embedding(padding_idx=p)` returns ZEROS for token p. Torch returns the stored
  row and only withholds its gradient. With any weights but torch's own init (a checkpoint,
  or align's perturbed init) the outputs differ wherever the pad token appears.
- Paddle keeps the constructor arguments under private names (`_num_embeddings`,
  `_padding_idx`, conv `_stride`, ...); HF code reads torch's public ones.
"""

from __future__ import annotations

import paddle


class Embedding(paddle.nn.Layer):
    """torch.nn.Embedding: the pad row is returned as stored; only its gradient is withheld."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, *args, **kwargs):
        super().__init__()
        if max_norm is not None:
            raise NotImplementedError("Embedding(max_norm=...) renormalizes rows in place; not supported")
        if padding_idx is not None and padding_idx < 0:
            padding_idx += num_embeddings
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.weight = self.create_parameter([num_embeddings, embedding_dim],
                                            default_initializer=paddle.nn.initializer.Normal(0.0, 1.0))
        if padding_idx is not None:  # torch zeroes the pad row at init
            with paddle.no_grad():
                self.weight[padding_idx] = 0.0

    def forward(self, input_ids: paddle.Tensor) -> paddle.Tensor:
        weight = self.weight
        if self.padding_idx is not None and not weight.stop_gradient:
            # The same values, but no gradient reaches the pad row: keep = 0 there.
            keep = paddle.ones([self.num_embeddings, 1], dtype=weight.dtype)
            keep[self.padding_idx] = 0.0
            weight = weight * keep + (weight * (1.0 - keep)).detach()
        return paddle.nn.functional.embedding(input_ids, weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}"


def _conv(base: type, dims: int) -> type:
    """A Paddle conv layer that also answers to torch's attribute names."""

    def pair(v):
        return tuple(v) if isinstance(v, (list, tuple)) else (v,) * dims

    class Conv(base):
        def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                     bias=True, padding_mode="zeros"):
            super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                             dilation=dilation, groups=groups, bias_attr=None if bias else False,
                             padding_mode=padding_mode)
            self.in_channels, self.out_channels = in_channels, out_channels
            self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
            self.padding = padding if isinstance(padding, str) else pair(padding)
            self.groups, self.padding_mode = groups, padding_mode

    Conv.__name__ = Conv.__qualname__ = f"Conv{dims}d"
    return Conv


Conv1d = _conv(paddle.nn.Conv1D, 1)
Conv2d = _conv(paddle.nn.Conv2D, 2)
