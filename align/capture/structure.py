"""Walking the nested inputs and outputs of module calls (tuples, dicts, dataclasses), so that
every tensor in them has a stable name: "out", "0.1", "past.key", "hidden_states"."""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from align.capture.trace import ROOT, Arr, Framework, Opaque


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


def snapshot(obj: Any, fw: Framework, record: Any = None) -> Any:
    """A framework-free copy of an input structure: tensors -> Arr, plain values kept."""
    if fw.is_tensor(obj):
        return (record or fw.record)(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Mapping):
        return {k: snapshot(v, fw, record) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        items = [snapshot(v, fw, record) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    return Opaque(type(obj).__name__)


def module_path(prefix: str, inner: str) -> str:
    """A module's name in the whole model, from its name inside the submodule `prefix`
    ("" when the model is the whole: the model itself is then ROOT)."""
    if prefix:
        return f"{prefix}.{inner}" if inner else prefix
    return inner or ROOT


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


@dataclass
class Feed:
    """A model's inputs as it is called: positional and keyword arguments, and the inputs whose
    gradients are judged (`leaves`, by the reference's name for each: its keyword, or for a
    positional one its forward's parameter name)."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    leaves: dict[str, Any] = field(default_factory=dict)

    def __call__(self, model: Any) -> Any:
        return model(*self.args, **self.kwargs)


def as_feed(inputs: Any) -> Feed:
    """A Feed, from a Feed or from a dict of keyword arguments."""
    return inputs if isinstance(inputs, Feed) else Feed(kwargs=dict(inputs))
