"""Record every module call of one model: inputs, outputs, output gradients, parameter grads.

Hooks live only inside `hooked(...)`, a context manager that removes them in `finally`.
Torch and Paddle meet only here and in replay, through a small adapter (`align.torch_side`,
`align.paddle_side`); everything a Trace holds is numpy.

Each module's outputs pass through an exact identity at the module boundary, and the
gradient is recorded on that identity. The recorded gradient is therefore the EXTERNAL one,
what flows into the module from the rest of the network, even when one output is computed
from another inside the module (attention's output from its weights, the loss from the
logits). Replaying a module with these gradients gives its own backward, nothing counted twice.
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

ROOT = "<root>"


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


def flatten(obj: Any, fw: Framework, prefix: str = "") -> list[tuple[str, Any]]:
    """(path, leaf) pairs of a nested output or input structure; None leaves are dropped."""
    join = (lambda k: f"{prefix}.{k}") if prefix else str
    if fw.is_tensor(obj):
        return [(prefix or "out", obj)]
    if obj is None:
        return []
    if isinstance(obj, Mapping):
        return [p for k, v in obj.items() for p in flatten(v, fw, join(k))]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [p for f in dataclasses.fields(obj) for p in flatten(getattr(obj, f.name), fw, join(f.name))]
    if isinstance(obj, (tuple, list)):
        return [p for i, v in enumerate(obj) for p in flatten(v, fw, join(i))]
    return [(prefix or "out", obj)]


def map_tensors(obj: Any, fw: Framework, fn: Any) -> Any:
    """The same structure with every tensor replaced by fn(tensor). Mappings and dataclasses
    are updated in place: they are fresh module outputs that nobody else holds yet."""
    if fw.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, Mapping) and hasattr(obj, "__setitem__"):
        for k in list(obj.keys()):
            if obj[k] is not None:
                obj[k] = map_tensors(obj[k], fw, fn)
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            setattr(obj, f.name, map_tensors(getattr(obj, f.name), fw, fn))
        return obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_tensors(v, fw, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(v, fw, fn) for v in obj)
    return obj


def _snapshot(obj: Any, fw: Framework, record: Any = None) -> Any:
    """A framework-free copy of an input structure: tensors -> Arr, plain values kept."""
    if fw.is_tensor(obj):
        return (record or fw.record)(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Mapping):
        return {k: _snapshot(v, fw, record) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        items = [_snapshot(v, fw, record) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    return Opaque(type(obj).__name__)


class Sink(Protocol):
    """What happens at module boundaries while `hooked` is installed.

    `enter` may return replacement (args, kwargs) and `exit` a replacement output: the
    recorder wraps them in identities to catch gradients, the teacher-forcing sink swaps in
    the reference's tensors."""

    def enter(self, call: Call, module: Any, args: tuple, kwargs: dict, caller: Call | None) -> tuple | None: ...
    def exit(self, call: Call, module: Any, args: tuple, output: Any, caller: Call | None) -> Any: ...


def module_path(prefix: str, inner: str) -> str:
    """A module's name in the whole model, from its name inside the submodule `prefix`
    ("" when the model is the whole: the model itself is then ROOT)."""
    if prefix:
        return f"{prefix}.{inner}" if inner else prefix
    return inner or ROOT


@contextmanager
def hooked(fw: Framework, model: Any, sink: Sink, prefix: str = "") -> Iterator[dict[str, Call]]:
    """Hook every module of `model` for `sink`; yields the calls as they complete.

    A module's n-th call (n > 1) is named "path#n"; `caller` is the innermost call still
    open, the module whose forward made this call. With a `prefix`, `model` is that
    submodule of a larger model and paths are the larger model's ("model.layers.3.mlp")."""
    calls: dict[str, Call] = {}
    stack: list[Call] = []
    counts: dict[str, int] = {}
    handles = []
    clock = {"start": 0, "end": 0}

    def pre(path: str, type_name: str):
        def hook(module, args, kwargs):
            counts[path] = counts.get(path, 0) + 1
            name = path if counts[path] == 1 else f"{path}#{counts[path]}"
            call = Call(name, path, type_name, clock["start"])
            call.arg_names = positional_names(module.forward)[: len(args)]
            clock["start"] += 1
            caller = stack[-1] if stack else None
            stack.append(call)
            return sink.enter(call, module, tuple(args), dict(kwargs), caller)

        return hook

    def post(module, args, output):
        call = stack.pop()
        call.end = clock["end"]
        clock["end"] += 1
        calls[call.name] = call
        return sink.exit(call, module, args, output, stack[-1] if stack else None)

    try:
        for path, module in fw.modules(model):
            path = module_path(prefix, path)
            handles.append(fw.pre_hook(module, pre(path, type(module).__name__)))
            handles.append(fw.post_hook(module, post))
        yield calls
    finally:
        for h in handles:
            h.remove()


def named_inputs(args: tuple, kwargs: dict, arg_names: tuple[str, ...], fw: Framework | None = None):
    """(path, leaf) for every leaf of a call's inputs: positional args by the forward's
    parameter names, nested items by ".i" / ".key"."""
    out = []

    def walk(obj: Any, path: str) -> None:
        if (fw.is_tensor(obj) if fw else isinstance(obj, Arr)):
            out.append((path, obj))
        elif isinstance(obj, Mapping):
            for k, v in obj.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(obj, (tuple, list)):
            for i, v in enumerate(obj):
                walk(v, f"{path}.{i}")

    for i, a in enumerate(args):
        walk(a, arg_names[i] if i < len(arg_names) else f"args[{i}]")
    walk(kwargs, "")
    return out


def map_inputs(args: tuple, kwargs: dict, arg_names: tuple[str, ...], fw: Framework | None,
               fn: Any) -> tuple[tuple, dict]:
    """(args, kwargs) with every tensor leaf (with no `fw`, every recorded Arr) replaced by
    fn(path, leaf); paths as named_inputs."""

    def walk(obj: Any, path: str) -> Any:
        if (fw.is_tensor(obj) if fw else isinstance(obj, Arr)):
            return fn(path, obj)
        if isinstance(obj, dict):
            return {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in obj.items()}
        if isinstance(obj, (tuple, list)) and not hasattr(obj, "_fields"):
            items = [walk(v, f"{path}.{i}") for i, v in enumerate(obj)]
            return items if isinstance(obj, list) else tuple(items)
        return obj

    new_args = tuple(walk(a, arg_names[i] if i < len(arg_names) else f"args[{i}]") for i, a in enumerate(args))
    return new_args, walk(kwargs, "")


class Recorder:
    """The sink that records: inputs (optionally), outputs, and the gradients that cross
    each module boundary in both directions.

    Floating inputs and outputs pass through an exact identity at the boundary, and the
    gradient is taken on that identity: at an output it is the EXTERNAL gradient (what the
    rest of the network sends back), at an input it is what the module itself sends back.
    A tensor handed to several modules is snapshotted once.

    With `share`, records share the tensors' memory where the framework can tell afterwards
    whether anything wrote to them (`overwritten`); a run that did must be recorded again
    without sharing. Copying every activation and gradient is most of what recording costs.
    """

    def __init__(self, fw: Framework, keep_inputs: bool, share: bool = False):
        self.fw, self.keep_inputs = fw, keep_inputs
        self._seen: dict[int, tuple[Any, Arr]] = {}  # id -> (tensor kept alive, its snapshot)
        self._borrowed: list[Any] = []  # what to check for writes after the run
        borrowed = self._borrowed

        def keep(t: Any) -> Arr:
            """A record of `t`: shared with it when allowed and possible, else a copy. (Not a
            method: the gradient hooks hold it, and through a method they would hold this
            Recorder, whose snapshot cache holds the hooked tensors, whose graphs hold the
            weights: a cycle only the garbage collector breaks, one model's worth per run.)"""
            lent = fw.borrow(t) if share else None
            if lent is None:
                return fw.record(t)
            borrowed.append(lent[1])
            return lent[0]

        self.keep = keep

    def forget(self) -> None:
        """Drop the tensors kept for de-duplication (and, through their graphs, the weights)."""
        self._seen.clear()

    def overwritten(self) -> bool:
        """Whether anything wrote in place to a tensor whose memory a record shares."""
        return any(self.fw.written(token) for token in self._borrowed)

    def snapshot(self, t: Any) -> Arr:
        hit = self._seen.get(id(t))
        if hit is None or hit[0] is not t:
            hit = self._seen[id(t)] = (t, self.keep(t))
        return hit[1]

    def enter(self, call: Call, module: Any, args: tuple, kwargs: dict, caller: Call | None) -> tuple | None:
        fw = self.fw
        if self.keep_inputs:
            call.args, call.kwargs = _snapshot(args, fw, self.snapshot), _snapshot(kwargs, fw, self.snapshot)

        keep = self.keep

        def wrap(path: str, t: Any) -> Any:
            if not fw.needs_grad(t):
                return t
            out = fw.identity(t)
            fw.on_grad(out, lambda g: call.input_grads.__setitem__(path, keep(g).data))
            return out

        if not any(fw.needs_grad(t) for _, t in named_inputs(args, kwargs, call.arg_names, fw)):
            return None
        return map_inputs(args, kwargs, call.arg_names, fw, wrap)

    def exit(self, call: Call, module: Any, args: tuple, output: Any, caller: Call | None) -> Any:
        fw = self.fw
        leaves = [(p, t) for p, t in flatten(output, fw) if fw.is_tensor(t)]
        for path, t in leaves:
            call.outputs[path] = self.snapshot(t)
        paths = iter(p for p, _ in leaves)
        keep = self.keep

        def wrap(t):
            path = next(paths)
            if not fw.needs_grad(t):
                return t
            out = fw.identity(t)
            fw.on_grad(out, lambda g, path=path: call.grads.__setitem__(path, keep(g).data))
            self._seen[id(out)] = (out, call.outputs[path])  # the consumer's input is this very value
            return out

        return map_tensors(output, fw, wrap)


def run_and_record(fw: Framework, model: Any, inputs: dict[str, Any], seed_fn: Any, keep_inputs: bool) -> Trace:
    """Run forward and backward once under hooks; return the Trace.

    `seed_fn(outputs) -> scalar` picks what to differentiate (the loss, when there is one).
    The records share the model's tensors (and its gradients) unless something wrote to one
    of them in place after it was recorded; then the run is recorded again, copying.
    """
    for share in (True, False):
        fw.clear_grads(model)
        recorder = Recorder(fw, keep_inputs, share)
        with hooked(fw, model, recorder) as calls:
            output = model(**inputs)
            fw.backward(seed_fn(output))
        recorder.forget()
        params = fw.parameters(model)
        param_grads = {k: recorder.keep(p.grad).data for k, p in params.items() if p.grad is not None}
        if not recorder.overwritten():
            break
    root = calls[ROOT]
    return Trace(
        framework=fw.name,
        calls={n: calls[n] for n in sorted(calls, key=lambda n: calls[n].end)},
        param_grads=param_grads,
        params_dtype={k: fw.dtype_name(p) for k, p in params.items()},
        outputs=dict(root.outputs),
    )


_POSITIONAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a bound forward's function -> its names


def positional_names(forward: Any) -> tuple[str, ...]:
    """Names of a forward's positional parameters, so inputs are keyed the same whether a
    caller passed them by position or by keyword. (Asked at every call: for a bound method,
    kept per function, since inspect.signature costs more than a small module's forward.)"""
    func = getattr(forward, "__func__", None)
    names = None if func is None else _POSITIONAL.get(func)
    if names is None:
        names = tuple(p.name for p in inspect.signature(forward).parameters.values()
                      if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))
        if func is not None:
            _POSITIONAL[func] = names
    return names


def accepted_kwargs(forward: Any) -> set[str] | None:
    """Keyword names a forward accepts; None if it takes **kwargs (accepts anything)."""
    params = inspect.signature(forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
