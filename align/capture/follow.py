"""The free-running pass: the port runs on its own values, and each module is compared with
the reference as it goes; the error shows how it accumulates with depth."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from align.capture.force import Judge, _arg_names, _produced
from align.capture.structure import flatten, map_tensors, named_inputs
from align.capture.trace import BACKWARD, FORWARD, Arr, Call, Framework, differentiable


class Follower:
    """The sink for the free-running run: the port runs on its own values, and each module's
    outputs and output gradients are compared with the reference's the moment they exist.
    Only the root's outputs are kept (for the model-output table and the observer check).

    `error(port, ref)` measures how far apart a module's inputs, and its outputs, are (a
    relative L2 error, compare.metrics.rel_l2): the amplification the report shows."""

    def __init__(self, fw: Framework, ref_calls: dict[str, Call], to_ref: dict[str, str], judge: Judge,
                 error: Callable[[np.ndarray, np.ndarray], float]):
        self.fw, self.ref_calls, self.to_ref, self.judge, self.error = fw, ref_calls, to_ref, judge, error
        self.input_error: dict[str, float] = {}
        self.output_error: dict[str, float] = {}
        self.called: set[str] = set()
        self.extra: dict[str, list[str]] = {}
        self.root_outputs: dict[str, Arr] = {}  # the port's own names (the observer check's)
        self.model_outputs: dict[str, Arr] = {}  # the same, under the reference's names
        self.pending: dict[tuple[str, str], np.ndarray] = {}  # output gradients expected, not yet seen

    def enter(self, call: Call, module: Any, args: tuple, kwargs: dict, caller: Call | None) -> None:
        ref_name = self.to_ref.get(call.name)
        if ref_name is None:
            return None
        ref_call = self.ref_calls[ref_name]
        names = _arg_names(call, ref_call, len(args))
        ref_in = {p: a for p, a in named_inputs(ref_call.args, ref_call.kwargs, ref_call.arg_names)
                  if differentiable(a.dtype)}
        errors = [self.error(self.fw.view(t), ref_in[p].data)
                  for p, t in named_inputs(args, kwargs, names, self.fw) if p in ref_in]
        self.input_error[ref_name] = max(errors, default=0.0)
        return None

    def exit(self, call: Call, module: Any, args: tuple, output: Any, caller: Call | None) -> Any:
        fw = self.fw
        ref_name = self.to_ref.get(call.name)
        if caller is None:
            self.root_outputs = {p: fw.record(t) for p, t in flatten(output, fw) if fw.is_tensor(t)}
        if ref_name is None:
            return output
        self.called.add(ref_name)
        ref_call = self.ref_calls[ref_name]
        flat, self.extra[ref_name] = _produced(fw, self.judge, ref_name, ref_call, output, caller is None)
        if caller is None:  # the model-output table pairs them under the reference's names
            self.model_outputs = dict(zip((p for p, _ in flat), self.root_outputs.values(), strict=True))
        errors = []
        paths = iter(p for p, _ in flat)

        def follow(t: Any) -> Any:
            path = next(paths)
            a = ref_call.outputs.get(path)
            if a is None:
                return t
            port = fw.view(t)
            if fw.dtype_name(t) != a.dtype:
                self.judge.fail(ref_name, FORWARD, f"output {path}", f"dtype mismatch: port {fw.dtype_name(t)}"
                                f"{list(t.shape)} vs reference {a.dtype}{list(a.data.shape)}")
            else:
                self.judge.compare(ref_name, FORWARD, f"output {path}", port, a.data)
            errors.append(self.error(port, a.data))
            if path not in ref_call.grads:
                return t
            if not fw.needs_grad(t):
                self.judge.fail(ref_name, BACKWARD, f"grad of output {path}",
                                f"no gradient flows from the port's output {path}, while the reference's does")
                return t
            self.pending[ref_name, path] = ref_call.grads[path]
            out = fw.identity(t)
            fw.on_grad(out, lambda g, path=path: self._arrived(ref_name, path, g))
            return out

        output = map_tensors(output, fw, follow)
        self.output_error[ref_name] = max(errors, default=0.0)
        return output

    def _arrived(self, ref_name: str, path: str, g: Any) -> None:
        self.judge.compare(ref_name, BACKWARD, f"grad of output {path}", self.fw.view(g),
                           self.pending.pop((ref_name, path)))

    def finish(self) -> None:
        """After backward: an output gradient that never arrived counts as zeros."""
        for (ref_name, path), ref_grad in self.pending.items():
            self.judge.compare(ref_name, BACKWARD, f"grad of output {path}", np.zeros_like(ref_grad), ref_grad)
        self.pending = {}
