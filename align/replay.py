"""Teacher forcing: run one module on the reference's recorded inputs, alone.

Forward: the module's outputs on the reference's inputs. Backward: seeded with the
reference's recorded external output gradients, the gradients w.r.t. the module's floating
inputs and its own (direct) parameters. Both sides are replayed the same way, so the
comparison sees only the module's OWN error, not what accumulated upstream or downstream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from align.capture import Arr, Call, Framework, Opaque, flatten


class Unreplayable(Exception):
    """The recorded call cannot be fed to the module (an opaque input, a signature mismatch)."""


@dataclass
class Local:
    """What one side computed for one module on the reference's inputs."""

    outputs: dict[str, Arr] = field(default_factory=dict)
    input_grads: dict[str, np.ndarray] = field(default_factory=dict)
    param_grads: dict[str, np.ndarray] = field(default_factory=dict)  # keyed by the module's own names
    ungradded: tuple[str, ...] = ()  # outputs the reference differentiates but this side cannot
    ignored: tuple[str, ...] = ()  # recorded keyword inputs this module's forward does not take


def _materialize(obj: Any, fw: Framework, path: str, leaves: list, grad: bool) -> Any:
    if isinstance(obj, Arr):
        needs = grad and obj.dtype.startswith(("float", "bfloat"))
        t = fw.tensor(obj, requires_grad=needs)
        if needs:
            leaves.append((path, t))
        return t
    if isinstance(obj, Opaque):
        raise Unreplayable(f"input {path} is a {obj.type_name} object, which cannot be recorded")
    if isinstance(obj, dict):
        return {k: _materialize(v, fw, f"{path}.{k}", leaves, grad) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        items = [_materialize(v, fw, f"{path}.{i}", leaves, grad) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    return obj


def run_local(fw: Any, model: Any, module_path: str, call: Call, filter_kwargs: bool,
              extra_kwargs: dict | None = None) -> Local:
    """Replay `call` (recorded on the reference) on `module_path` of `model`.

    With filter_kwargs, recorded keyword inputs the module's forward does not accept are
    dropped and listed in `ignored` (a port need not take the reference's unused extras).
    `extra_kwargs` (the port's call_kwargs, such as return_dict=True) go to any module whose
    forward takes them.
    """
    module = fw.submodule(model, module_path)
    differentiate = bool(call.grads)
    accepted = fw.accepted_kwargs(module) if filter_kwargs else None
    ignored = [k for k, v in call.kwargs.items() if accepted is not None and k not in accepted and v is not None]
    extra = {k: v for k, v in (extra_kwargs or {}).items() if accepted is None or k in accepted}
    leaves: list[tuple[str, Any]] = []
    args = tuple(_materialize(v, fw, call.arg_path(i), leaves, differentiate) for i, v in enumerate(call.args))
    kwargs = {
        k: _materialize(v, fw, k, leaves, differentiate)
        for k, v in call.kwargs.items()
        if accepted is None or k in accepted
    }
    try:
        output = module(*args, **{**kwargs, **extra})
    except TypeError as e:
        raise Unreplayable(f"the recorded inputs do not fit {type(module).__name__}.forward: {e}") from None

    local = Local(ignored=tuple(ignored))
    flat = [(p, t) for p, t in flatten(output, fw) if fw.is_tensor(t)]
    local.outputs = {p: fw.record(t) for p, t in flat}
    if not differentiate:
        return local

    by_path = dict(flat)
    seeded = [(p, by_path[p], g) for p, g in call.grads.items() if p in by_path and fw.needs_grad(by_path[p])]
    local.ungradded = tuple(p for p in call.grads if p not in by_path or not fw.needs_grad(by_path[p]))
    # Gradients are requested for EVERY parameter of the subtree, though only the module's
    # own are compared: Paddle 3.3.1's paddle.grad returns a wrong input gradient through
    # nn.LayerNorm when the norm's weight is not among the requested inputs.
    own = set(fw.direct_parameters(module))
    params = fw.parameters(module)
    targets = [t for _, t in leaves] + list(params.values())
    if not seeded or not targets:
        return local
    grads = fw.vjp([t for _, t, _ in seeded], [g for _, _, g in seeded], targets)
    names = [p for p, _ in leaves] + list(params)
    for i, (name, g) in enumerate(zip(names, grads)):
        if g is None:
            continue
        if i < len(leaves):
            local.input_grads[name] = g
        elif name in own:
            local.param_grads[name] = g
    return local
