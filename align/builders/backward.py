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
    """What backward differentiates: the model's loss, or, for a model without one
    (inputs.backward = "projection"), sum(output * R) over its floating outputs, with R a
    seeded standard-normal array per output, the same in both frameworks."""

    def pick(output):
        leaves = dict(flatten(output, fw))
        if spec.inputs.backward == "loss":
            if leaves.get("loss") is None:
                raise ConfigError(spec.source, f"models.{spec.name}.inputs.labels",
                                  'the model returned no loss; set labels, or backward = "projection"')
            return leaves["loss"]
        rng = np.random.default_rng(spec.inputs.seed + 1)
        total = None
        for path in sorted(leaves):
            t = leaves[path]
            if fw.is_tensor(t) and fw.needs_grad(t):
                r = rng.standard_normal(tuple(t.shape)).astype(np.float32)
                term = (t * fw.tensor(Arr(r, "float32"), False)).sum()
                total = term if total is None else total + term
        if total is None:
            raise ConfigError(spec.source, f"models.{spec.name}.inputs.backward", "the model returned no differentiable output")
        return total

    return pick
