"""What a run leaves behind, framework-free: every call of every module (Call), with its
inputs, outputs and the gradients at both of its boundaries, gathered in a Trace."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

ROOT = "<root>"
FORWARD, BACKWARD = "forward", "backward"  # the two directions every comparison is made in
PARAMETER_GRAD = "grad of parameter "  # the label of a parameter's gradient: this, then its reference key


def differentiable(dtype: str) -> bool:
    """Whether a recorded dtype is one a gradient flows through: floating or complex."""
    return dtype.startswith(("float", "bfloat", "complex"))


class Opaque:
    """A non-tensor, non-plain input (a cache object, a config): recorded by type only."""

    def __init__(self, type_name: str):
        self.type_name = type_name

    def __repr__(self) -> str:
        return f"<{self.type_name}>"


@dataclass(frozen=True)
class Arr:
    """A recorded tensor: numpy data plus the framework dtype it came from (bf16 is stored as fp32)."""

    data: np.ndarray
    dtype: str
    requires_grad: bool = False


class Framework(Protocol):
    name: str

    def is_tensor(self, x: Any) -> bool: ...
    def record(self, t: Any) -> Arr: ...
    def view(self, t: Any) -> np.ndarray: ...
    def borrow(self, t: Any) -> tuple[Arr, Any] | None: ...
    def written(self, token: Any) -> bool: ...
    def dtype_name(self, t: Any) -> str: ...
    def needs_grad(self, t: Any) -> bool: ...
    def identity(self, t: Any) -> Any: ...
    def on_grad(self, t: Any, fn: Any) -> None: ...
    def modules(self, root: Any) -> Iterator[tuple[str, Any]]: ...
    def pre_hook(self, module: Any, fn: Any) -> Any: ...
    def post_hook(self, module: Any, fn: Any) -> Any: ...
    def parameters(self, root: Any) -> dict[str, Any]: ...
    def grad(self, param: Any) -> np.ndarray | None: ...
    def backward(self, loss: Any) -> None: ...
    def tensor(self, arr: Arr, requires_grad: bool) -> Any: ...


@dataclass
class Call:
    """One call of one module."""

    name: str  # module path (ROOT for the model itself), "#n" appended for the n-th repeated call
    module: str  # module path
    type: str  # class name
    start: int  # position among forward starts
    end: int = -1  # position among forward completions
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    arg_names: tuple[str, ...] = ()  # forward's parameter name for each positional arg
    # forward's positional parameters, all of them: what another model's positional inputs
    # answer to, where this call passed them by keyword
    params: tuple[str, ...] = ()
    outputs: dict[str, Arr] = field(default_factory=dict)
    grads: dict[str, np.ndarray] = field(default_factory=dict)  # external d(loss)/d(output)
    input_grads: dict[str, np.ndarray] = field(default_factory=dict)  # what the module sends back to each input

    def arg_path(self, i: int) -> str:
        return self.arg_names[i] if i < len(self.arg_names) else f"args[{i}]"

    def release(self) -> None:
        """Drop the recorded tensors (written out, or no longer needed); the names stay."""
        self.args, self.kwargs, self.outputs, self.grads, self.input_grads = (), {}, {}, {}, {}


@dataclass
class Trace:
    """Everything recorded from one model run."""

    framework: str
    calls: dict[str, Call]  # in order of forward completion
    param_grads: dict[str, np.ndarray]
    params_dtype: dict[str, str]
    outputs: dict[str, Arr]  # the model's own outputs (logits, loss, ...)

    def output_bytes(self) -> int:
        """The memory of every module output recorded (each buffer once): about what a run
        of the model keeps for its backward."""
        seen = {id(a.data): a.data.nbytes for c in self.calls.values() for a in c.outputs.values()}
        return sum(seen.values())

    def completion_order(self) -> list[str]:
        return sorted(self.calls, key=lambda n: self.calls[n].end)

    def start_order(self) -> list[str]:
        return sorted(self.calls, key=lambda n: self.calls[n].start)
