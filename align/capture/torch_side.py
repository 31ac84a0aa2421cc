"""The torch adapter used by capture and replay (the reference side)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from align.capture.structure import accepted_kwargs
from align.capture.trace import ROOT, Arr

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
           torch.float64: "float64", torch.int64: "int64", torch.int32: "int32", torch.int16: "int16",
           torch.int8: "int8", torch.uint8: "uint8", torch.bool: "bool", torch.complex64: "complex64",
           torch.complex128: "complex128"}
_BY_NAME = {v: k for k, v in _DTYPES.items()}


class TorchSide:
    name = "torch"

    def is_tensor(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor)

    def record(self, t: torch.Tensor) -> Arr:
        return Arr(self.view(t).copy(), self.dtype_name(t), bool(t.requires_grad))

    def view(self, t: torch.Tensor) -> np.ndarray:
        """The tensor's values as numpy, sharing its memory where the dtype allows: for use
        before anything can write to it again."""
        t = t.detach()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()  # numpy has no bf16; fp32 holds every bf16 value exactly
        elif t.is_complex():
            t = t.resolve_conj()  # a lazily conjugated view has no numpy form
        return t.cpu().numpy()

    def borrow(self, t: torch.Tensor) -> tuple[Arr, Any] | None:
        """A record that shares the tensor's memory, and the tensor to check later (with
        `written`) that nothing wrote to it in place since. None when it cannot share."""
        if t.dtype in (torch.bfloat16, torch.float16) or t.device.type != "cpu":
            return None
        d = t.detach()  # shares the version counter: an in-place write through t shows on d
        return Arr(d.numpy(), self.dtype_name(t), bool(t.requires_grad)), (d, d._version)

    def written(self, token: Any) -> bool:
        d, version = token
        return d._version != version

    def dtype_name(self, t) -> str:
        return _DTYPES.get(t.dtype, str(t.dtype).removeprefix("torch."))

    def needs_grad(self, t: torch.Tensor) -> bool:
        return bool(t.requires_grad)

    def identity(self, t: torch.Tensor) -> torch.Tensor:
        return t.view_as(t)

    def on_grad(self, t: torch.Tensor, fn) -> None:
        def hook(g):
            fn(g)  # returns None: the gradient passes on unchanged

        t.register_hook(hook)

    def modules(self, root: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
        return iter(root.named_modules())

    def submodule(self, root: torch.nn.Module, path: str) -> torch.nn.Module:
        return root if path == ROOT else root.get_submodule(path)

    def pre_hook(self, module, fn):
        return module.register_forward_pre_hook(fn, with_kwargs=True)

    def post_hook(self, module, fn):
        return module.register_forward_hook(fn)

    def parameters(self, root: torch.nn.Module) -> dict[str, torch.Tensor]:
        return dict(root.named_parameters())

    def direct_parameters(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return dict(module.named_parameters(recurse=False))

    def buffers(self, root) -> dict:
        return dict(root.named_buffers())

    def nbytes(self, t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def clear_grads(self, model) -> None:
        model.zero_grad(set_to_none=True)

    def grad(self, param: torch.Tensor) -> np.ndarray | None:
        return None if param.grad is None else self.view(param.grad)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def tensor(self, arr: Arr, requires_grad: bool) -> torch.Tensor:
        t = torch.from_numpy(np.array(arr.data)).to(_BY_NAME[arr.dtype])
        return t.requires_grad_(True) if requires_grad else t

    def is_float(self, t: torch.Tensor) -> bool:
        """Floating or complex: the kinds a gradient flows through."""
        return t.is_floating_point() or t.is_complex()

    def complex_parts(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return t.real, t.imag

    def accepted_kwargs(self, module: torch.nn.Module) -> set[str] | None:
        return accepted_kwargs(module.forward)

    def drop_grad(self, t: torch.Tensor) -> bool:
        """Free a tensor's .grad; False if it has none (yet)."""
        had, t.grad = t.grad is not None, None
        return had

    def backward_from(self, tensors: list, grads: list[np.ndarray]) -> None:
        seeds = [torch.from_numpy(np.array(g)).to(t.dtype) for t, g in zip(tensors, grads)]
        torch.autograd.backward(tensors, seeds)

    def set_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

