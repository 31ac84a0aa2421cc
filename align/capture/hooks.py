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

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from align.capture.structure import (
    as_feed,
    flatten,
    map_inputs,
    map_tensors,
    module_path,
    named_inputs,
    positional_names,
    snapshot,
)
from align.capture.trace import ROOT, Arr, Call, Framework, Trace
from align.errors import ConfigError, one_line


class Sink(Protocol):
    """What happens at module boundaries while `hooked` is installed.

    `enter` may return replacement (args, kwargs) and `exit` a replacement output: the
    recorder wraps them in identities to catch gradients, the teacher-forcing sink swaps in
    the reference's tensors."""

    def enter(self, call: Call, module: Any, args: tuple, kwargs: dict, caller: Call | None) -> tuple | None: ...
    def exit(self, call: Call, module: Any, args: tuple, output: Any, caller: Call | None) -> Any: ...


class ModelRaised(Exception):
    """The model's own code raised while it ran under hooks: in `module` (the innermost call
    still open), `error`."""

    def __init__(self, module: str, error: BaseException):
        self.module, self.error = module, error
        self.forcer: Any = None  # a forced pass that raised: what it judged until then
        super().__init__(f"{module}: {type(error).__name__}: {one_line(error)}")


class Calls(dict):
    """The calls of a hooked run by name, in order of completion; `open` holds those that have
    started and not yet returned (after an exception: the modules it went through)."""

    def __init__(self):
        super().__init__()
        self.open: list[Call] = []

    def innermost(self) -> str | None:
        """The module the run was in when it stopped (None if it completed)."""
        return self.open[-1].module if self.open else None


@contextmanager
def hooked(fw: Framework, model: Any, sink: Sink, prefix: str = "") -> Iterator[Calls]:
    """Hook every module of `model` for `sink`; yields the calls as they complete.

    A module's n-th call (n > 1) is named "path#n"; `caller` is the innermost call still
    open, the module whose forward made this call. With a `prefix`, `model` is that
    submodule of a larger model and paths are the larger model's ("model.layers.3.mlp").
    If the model raises, the calls still open (Calls.open) say where: the last is innermost."""
    calls = Calls()
    stack = calls.open
    counts: dict[str, int] = {}
    handles = []
    clock = {"start": 0, "end": 0}

    def pre(path: str, type_name: str):
        def hook(module, args, kwargs):
            counts[path] = counts.get(path, 0) + 1
            name = path if counts[path] == 1 else f"{path}#{counts[path]}"
            call = Call(name, path, type_name, clock["start"])
            call.params = positional_names(module.forward)
            call.arg_names = call.params[: len(args)]
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
    except ModelRaised:
        raise  # from a hooked run inside this one: already placed
    except ConfigError:
        raise
    except Exception as e:
        if not calls.open:
            raise
        raise ModelRaised(calls.open[-1].module, e) from e
    finally:
        for h in handles:
            h.remove()


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
            call.args, call.kwargs = snapshot(args, fw, self.snapshot), snapshot(kwargs, fw, self.snapshot)

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


def run_and_record(fw: Framework, model: Any, inputs: Any, seed_fn: Any, keep_inputs: bool) -> Trace:
    """Run forward and backward once under hooks on `inputs` (a Feed, or a dict of keyword
    arguments); return the Trace.

    `seed_fn(outputs) -> scalar` picks what to differentiate (the loss, when there is one).
    The records share the model's tensors (and its gradients) unless something wrote to one
    of them in place after it was recorded; then the run is recorded again, copying.
    """
    for share in (True, False):
        fw.clear_grads(model)
        recorder = Recorder(fw, keep_inputs, share)
        with hooked(fw, model, recorder) as calls:
            output = as_feed(inputs)(model)
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


