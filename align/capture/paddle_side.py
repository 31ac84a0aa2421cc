"""The Paddle adapter used by capture and replay (the port side)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

with warnings.catch_warnings():
    # Paddle warns on import that ccache is missing; it only matters for building extensions.
    warnings.filterwarnings("ignore", message="No ccache found")
    import paddle

from align.capture.structure import accepted_kwargs
from align.capture.trace import ROOT, Arr

_DTYPES = {paddle.float32: "float32", paddle.bfloat16: "bfloat16", paddle.float16: "float16",
           paddle.float64: "float64", paddle.int64: "int64", paddle.int32: "int32", paddle.int16: "int16",
           paddle.int8: "int8", paddle.uint8: "uint8", paddle.bool: "bool", paddle.complex64: "complex64",
           paddle.complex128: "complex128"}


_FLOATS = frozenset({paddle.float32, paddle.bfloat16, paddle.float16, paddle.float64, paddle.complex64,
                     paddle.complex128})  # the kinds a gradient flows through


def _numpy(t: paddle.Tensor) -> np.ndarray:
    """An owned numpy copy."""
    data = t.detach()
    if data.dtype in (paddle.bfloat16, paddle.float16):
        data = data.astype("float32")  # numpy has no bf16; fp32 holds every bf16 value exactly
    return data.numpy()  # numpy() is already a copy


# Paddle's DLPack export costs about 2.5 us whatever the size; numpy() copies 16384 float32
# in about 1.3 us.
_COPY_BELOW = 1 << 14
_NUMPY = {name: np.dtype(name) for name in ("float32", "float64", "float16", "int64", "int32", "int16", "int8",
                                            "uint8", "bool", "complex64", "complex128")}


def _to_paddle(data: np.ndarray, dtype: str, share: bool) -> paddle.Tensor:
    """The values as a Paddle tensor of `dtype`: the array's own memory when `share` allows
    and Paddle can use it as is (DLPack refuses read-only arrays), else a copy."""
    same = data.dtype == _NUMPY.get(dtype)  # not dtype.name: a Python property, on every tensor made
    if share and same and data.flags.c_contiguous and data.flags.writeable and data.size > 0:
        return paddle.from_dlpack(data)
    t = paddle.to_tensor(np.array(data))
    return t if same else t.astype(dtype)


class PaddleSide:
    name = "paddle"

    def is_tensor(self, x: Any) -> bool:
        return isinstance(x, paddle.Tensor)

    def record(self, t: paddle.Tensor) -> Arr:
        return Arr(_numpy(t), self.dtype_name(t), not t.stop_gradient)

    def view(self, t: paddle.Tensor) -> np.ndarray:
        """The tensor's values as numpy, for use before anything can write to it again (a
        comparison made on the spot): a view of its memory where DLPack gives one, a copy
        where that is cheaper (small tensors) or the only way."""
        if t.dtype in (paddle.float32, paddle.float64, paddle.int64, paddle.int32, paddle.bool):
            if math.prod(t.shape) <= _COPY_BELOW:
                return t.numpy()  # a copy: below this size it costs less than making the view
            try:
                return np.from_dlpack(t.detach())
            except (BufferError, RuntimeError, TypeError, ValueError):
                pass  # a layout DLPack cannot describe: copy
        return _numpy(t)

    def borrow(self, t: paddle.Tensor) -> None:
        return None  # Paddle may reuse a gradient's buffer without a visible in-place write: always copy

    def written(self, token: Any) -> bool:
        return False  # nothing is ever lent (see borrow)

    def dtype_name(self, t) -> str:
        return _DTYPES.get(t.dtype, str(t.dtype).removeprefix("paddle."))

    def needs_grad(self, t: paddle.Tensor) -> bool:
        return not t.stop_gradient

    def identity(self, t: paddle.Tensor) -> paddle.Tensor:
        if t.is_contiguous():
            return t.view(t.shape)  # a new autograd node on the same memory
        return paddle.assign(t)

    def on_grad(self, t: paddle.Tensor, fn) -> None:
        def hook(g):
            fn(g)  # must return None: paddle crashes on any other non-tensor

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

    def nbytes(self, t: paddle.Tensor) -> int:
        return int(np.prod(t.shape)) * t.element_size()

    def clear_grads(self, model) -> None:
        model.clear_gradients(set_to_zero=False)  # free them: zero-filled grads keep their memory

    def grad(self, param: paddle.Tensor) -> np.ndarray | None:
        return None if param.grad is None else self.view(param.grad)

    def backward(self, loss: paddle.Tensor) -> None:
        loss.backward()

    def tensor(self, arr: Arr, requires_grad: bool) -> paddle.Tensor:
        """A tensor of the recorded values. A leaf that requires grad shares the record's
        memory (Paddle refuses in-place writes to such a leaf); any other tensor is a copy,
        since the model may write to it."""
        t = _to_paddle(arr.data, arr.dtype, share=requires_grad)
        t.stop_gradient = not requires_grad
        return t

    def complex_parts(self, t: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        return paddle.real(t), paddle.imag(t)

    def is_float(self, t: paddle.Tensor) -> bool:
        return t.dtype in _FLOATS  # what t.is_floating_point() says, without its Python overhead

    def accepted_kwargs(self, module: paddle.nn.Layer) -> set[str] | None:
        return accepted_kwargs(module.forward)

    def drop_grad(self, t: paddle.Tensor) -> bool:
        """Free a tensor's .grad; False if it has none (yet)."""
        g = t.grad
        if g is None or not g._is_initialized():
            return False
        g._clear_data()  # its memory (clear_gradient during a backward only zeroes it)
        return True

    def backward_from(self, tensors: list, grads: list[np.ndarray]) -> None:
        # Paddle reads the seeds and never writes to them: they may share the records' memory.
        seeds = [_to_paddle(g, self.dtype_name(t), share=True) for t, g in zip(tensors, grads)]
        paddle.autograd.backward(tensors, seeds)

    def set_seed(self, seed: int) -> None:
        paddle.seed(seed)
