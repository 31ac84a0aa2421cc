"""What backward starts from: the model's loss, or a seeded random projection of its outputs,
the same in both frameworks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from align.capture.structure import flatten
from align.capture.trace import Arr
from align.errors import ConfigError
from align.registry.spec import ModelSpec


def backward_seed(fw, spec: ModelSpec) -> Callable[[Any], Any]:
    """What backward differentiates, from the model's output (inputs.backward):
    - "loss": the output named loss (a model given labels);
    - "output:PATH": the one output named PATH ("out" for a module returning one tensor);
    - "projection": sum(output * R) over every floating output, R a seeded standard-normal
      array per output (the same in both frameworks), so that every output's gradient is
      exercised; a complex output is projected by its real and imaginary parts."""
    how = spec.inputs.backward
    key = f"models.{spec.name}.inputs.backward"

    def pick(output):
        leaves = dict(flatten(output, fw))
        if how == "loss" or how.startswith("output:"):
            name = "loss" if how == "loss" else how[len("output:"):]
            t = leaves.get(name)
            if t is None or not fw.is_tensor(t):
                known = ", ".join(p for p, v in leaves.items() if fw.is_tensor(v)) or "none"
                hint = "; give the model labels, or" if how == "loss" else "; or set"
                raise ConfigError(spec.source, key, f"the model returned no output {name!r} (its outputs: {known})"
                                                    f"{hint} backward = \"projection\"")
            if tuple(t.shape) not in ((), (1,)):
                raise ConfigError(spec.source, key, f"output {name!r} has shape {list(t.shape)}, not a scalar to "
                                                    f"differentiate; use backward = \"projection\"")
            return t.sum() if tuple(t.shape) == (1,) else t
        rng = np.random.default_rng(spec.inputs.seed + 1)
        total = None
        for path in sorted(leaves):
            t = leaves[path]
            if not (fw.is_tensor(t) and fw.needs_grad(t)):
                continue
            parts = fw.complex_parts(t) if fw.dtype_name(t).startswith("complex") else (t,)
            for part in parts:
                r = rng.standard_normal(tuple(part.shape)).astype(np.float32)
                term = (part * fw.tensor(Arr(r, "float32"), False)).sum()
                total = term if total is None else total + term
        if total is None:
            raise ConfigError(spec.source, key, "the model returned no differentiable output")
        return total

    return pick
