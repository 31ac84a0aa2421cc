"""Compare paired tensors into results: per layer, per model output, per parameter gradient.

Pure numpy. Everything here is a frozen dataclass with to_dict(); nothing prints.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from align.metrics import Metrics, combine, compare_arrays, missing
from align.spec import Override, Tolerance

FORWARD, BACKWARD = "forward", "backward"
TEACHER_FORCED, FREE_RUNNING = "teacher_forced", "free_running"


@dataclass(frozen=True)
class LayerResult:
    name: str  # reference call name
    port_name: str
    type: str  # reference class name
    forward: Metrics
    backward: Metrics | None  # None: no gradient flows through this module on either side
    tolerance: Tolerance
    ignored_inputs: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.forward.passed and (self.backward is None or self.backward.passed)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "port_name": self.port_name,
            "type": self.type,
            "forward": self.forward.to_dict(),
            "backward": None if self.backward is None else self.backward.to_dict(),
            "passed": self.passed,
            "tolerance": asdict(self.tolerance),
            "ignored_inputs": list(self.ignored_inputs),
        }


@dataclass(frozen=True)
class TensorResult:
    """A named tensor compared on its own: a model output or a parameter gradient."""

    name: str
    metrics: Metrics
    tolerance: Tolerance

    @property
    def passed(self) -> bool:
        return self.metrics.passed

    def to_dict(self) -> dict:
        return {"name": self.name, **self.metrics.to_dict(), "tolerance": asdict(self.tolerance)}


@dataclass(frozen=True)
class Divergence:
    forward: str | None
    backward: str | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RunResult:
    """One dtype in one mode."""

    dtype: str
    mode: str
    tolerance: Tolerance
    policy: str  # the tolerance rule in words
    layers: tuple[LayerResult, ...] = ()
    first_divergence: Divergence = field(default_factory=lambda: Divergence(None, None))
    status: str = "ran"  # "ran" or "not_run"
    reason: str = ""  # why it did not run
    gated: bool = True

    @property
    def passed(self) -> bool | None:
        if self.status != "ran":
            return None
        return bool(self.layers) and all(layer.passed for layer in self.layers)

    def to_dict(self) -> dict:
        return {
            "dtype": self.dtype,
            "mode": self.mode,
            "status": self.status,
            "reason": self.reason,
            "gated": self.gated,
            "passed": self.passed,
            "tolerance": {**asdict(self.tolerance), "policy": self.policy},
            "first_divergence": self.first_divergence.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers],
        }


class Tolerances:
    """The model's tolerance plus glob overrides over reference names. An override that
    matches nothing is an error: a silent override is a typo nobody sees."""

    def __init__(self, default: Tolerance, overrides: tuple[Override, ...] = ()):
        self.default, self.overrides = default, overrides

    def for_name(self, name: str) -> Tolerance:
        tol = self.default
        for o in self.overrides:
            if fnmatch.fnmatchcase(name, o.glob):
                tol = o.tolerance
        return tol

    def unmatched(self, names: list[str]) -> list[str]:
        return [o.glob for o in self.overrides if not any(fnmatch.fnmatchcase(n, o.glob) for n in names)]


def compare_named(port: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], tol: Tolerance,
                  what: str) -> Metrics | None:
    """Compare two dicts of tensors keyed alike; a key on one side only fails. None if both empty."""
    parts = []
    for key in ref:
        label = f"{what} {key}"
        if key not in port:
            parts.append(missing(f"the port produced no {what} {key!r}", label))
        else:
            parts.append(compare_arrays(port[key], ref[key], tol, label))
    for key in port:
        if key not in ref:
            parts.append(missing(f"the port produced {what} {key!r}, which the reference has not", f"{what} {key}"))
    return combine(parts)


def first_divergence(layers: tuple[LayerResult, ...], forward_order: list[str], backward_order: list[str]) -> Divergence:
    """First failing module in forward completion order, and in backward order.

    Children complete their forward before their parents and their backward before their
    parents, so in both orders the first failure is the smallest module that fails.
    """
    by_name = {layer.name: layer for layer in layers}
    fwd = next((n for n in forward_order if n in by_name and not by_name[n].forward.passed), None)
    bwd = next((n for n in backward_order if n in by_name and by_name[n].backward is not None
                and not by_name[n].backward.passed), None)
    return Divergence(fwd, bwd)


def mismatch_message(name: str, direction: str, m: Metrics, tol: Tolerance, dtype: str, mode: str) -> str:
    """A torch.testing-style account of one failing comparison."""
    what = "forward output" if direction == FORWARD else "gradient"
    lines = [f"{name}: {what} is not close! ({dtype}, {mode.replace('_', '-')})"]
    if m.note:
        lines.append(m.note)
    if m.numel:
        lines.append(f"Mismatched elements: {m.mismatched} / {m.numel} ({100.0 * m.mismatched / m.numel:.1f}%)")
        lines.append(f"Greatest absolute difference: {m.max_abs:.3g} at {m.worst} (up to {tol.atol:g} allowed)")
        lines.append(f"Greatest relative difference: {m.max_rel:.3g} (up to {tol.rtol:g} allowed)")
        lines.append(f"Cosine {m.cosine:.6f} | smallest passing atol {m.needed_atol:.3g}")
    return "\n".join(lines)
