"""The Paddle adapter used by capture and replay (the port side)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import warnings

import numpy as np

with warnings.catch_warnings():
    # Paddle warns on import that ccache is missing; it only matters for building extensions.
    warnings.filterwarnings("ignore", message="No ccache found")
    import paddle

from align.capture import ROOT, Arr, accepted_kwargs

_DTYPES = {paddle.float32: "float32", paddle.bfloat16: "bfloat16", paddle.float16: "float16",
           paddle.float64: "float64", paddle.int64: "int64", paddle.int32: "int32", paddle.bool: "bool"}


class PaddleSide:
    name = "paddle"

    def is_tensor(self, x: Any) -> bool:
        return isinstance(x, paddle.Tensor)

    def record(self, t: paddle.Tensor) -> Arr:
        dtype = self.dtype_name(t)
        data = t.detach()
        if data.dtype in (paddle.bfloat16, paddle.float16):
            data = data.astype("float32")  # numpy has no bf16; fp32 holds every bf16 value exactly
        return Arr(data.numpy(), dtype, not t.stop_gradient)  # numpy() is already a copy

    def dtype_name(self, t) -> str:
        return _DTYPES.get(t.dtype, str(t.dtype).removeprefix("paddle."))

    def needs_grad(self, t: paddle.Tensor) -> bool:
        return not t.stop_gradient

    def identity(self, t: paddle.Tensor) -> paddle.Tensor:
        return paddle.assign(t)

    def on_grad(self, t: paddle.Tensor, fn) -> None:
        def hook(g):
            fn(self.record(g).data)  # must return None: paddle crashes on any other non-tensor

        t.register_hook(hook)

    def modules(self, root: paddle.nn.Layer) -> Iterator[tuple[str, paddle.nn.Layer]]:
        return iter(root.named_sublayers(include_self=True))

    def submodule(self, root: paddle.nn.Layer, path: str) -> paddle.nn.Layer:
        if path == ROOT:
            return root
        return dict(root.named_sublayers())[path]

    def pre_hook(self, module, fn):
        return module.register_forward_pre_hook(fn, with_kwargs=True)

    def post_hook(self, module, fn):
        return module.register_forward_post_hook(fn)

    def parameters(self, root: paddle.nn.Layer) -> dict[str, paddle.Tensor]:
        return dict(root.named_parameters())

    def direct_parameters(self, module: paddle.nn.Layer) -> dict[str, paddle.Tensor]:
        return dict(module.named_parameters(include_sublayers=False))

    def buffers(self, root) -> dict:
        return dict(root.named_buffers())

    def clear_grads(self, model) -> None:
        model.clear_gradients(set_to_zero=False)  # free them: zero-filled grads keep their memory

    def grad(self, param: paddle.Tensor) -> np.ndarray | None:
        return None if param.grad is None else self.record(param.grad).data

    def backward(self, loss: paddle.Tensor) -> None:
        loss.backward()

    def tensor(self, arr: Arr, requires_grad: bool) -> paddle.Tensor:
        t = paddle.to_tensor(np.array(arr.data)).astype(arr.dtype)
        t.stop_gradient = not requires_grad
        return t

    def is_float(self, t: paddle.Tensor) -> bool:
        return t.is_floating_point()

    def accepted_kwargs(self, module: paddle.nn.Layer) -> set[str] | None:
        return accepted_kwargs(module.forward)

    def backward_from(self, tensors: list, grads: list[np.ndarray]) -> None:
        seeds = [paddle.to_tensor(np.array(g)).astype(t.dtype) for t, g in zip(tensors, grads)]
        paddle.autograd.backward(tensors, seeds)

    def set_seed(self, seed: int) -> None:
        paddle.seed(seed)
