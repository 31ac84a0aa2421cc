"""Compare paired tensors into results: per layer, per model output, per parameter gradient.

Pure numpy. Everything here is a frozen dataclass with to_dict(); nothing prints.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from align.capture import ROOT
from align.metrics import Metrics, combine, compare_arrays, missing, scratch, sum_squares, within_noise
from align.spec import Override, Tolerance, unmatched

FORWARD, BACKWARD = "forward", "backward"
TEACHER_FORCED, FREE_RUNNING = "teacher_forced", "free_running"


@dataclass(frozen=True)
class Amplification:
    """Free-running: how much a module grows the error it was handed (relative L2 errors)."""

    input_error: float  # worst over the module's floating inputs; 0 when it has none
    output_error: float  # worst over its outputs
    flagged: bool  # its output error is well beyond what its input error explains

    @classmethod
    def of(cls, input_error: float, output_error: float) -> Amplification:
        """Flagged when the output error is beyond AMPLIFICATION_FLOOR and more than
        AMPLIFICATION_FACTOR times the input error."""
        flagged = output_error > AMPLIFICATION_FLOOR and output_error > AMPLIFICATION_FACTOR * input_error
        return cls(input_error, output_error, flagged)

    @property
    def ratio(self) -> float:
        return self.output_error / self.input_error if self.input_error > 0 else float("inf")

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


# A module is flagged when its relative output error exceeds AMPLIFICATION_FLOOR and is more
# than AMPLIFICATION_FACTOR times its relative input error. The floor keeps fp32 rounding
# (1e-7 relative, from an exact input) from being flagged as infinite amplification.
AMPLIFICATION_FACTOR = 10.0
AMPLIFICATION_FLOOR = 1e-5


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    """||actual - expected|| / ||expected||; inf for a non-finite or shape-mismatched pair.

    float32 pairs are measured in float32 (the difference of close values is exact, and
    the ratio feeds a factor-of-10 test); float64 only when that over- or underflows."""
    if actual.shape != expected.shape:
        return float("inf")
    if actual.dtype == expected.dtype == np.float32 and actual.size:
        with np.errstate(over="ignore", invalid="ignore"):
            d = np.subtract(actual, expected, out=scratch(0, expected.shape, np.float32))
            num, den = sum_squares(d), sum_squares(expected)
        if np.isfinite(num) and np.isfinite(den) and den > 1e-30:
            return float(np.sqrt(num / den))
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    if not (np.isfinite(a).all() and np.isfinite(e).all()):
        return float("inf")
    num, den = float(np.linalg.norm(a - e)), float(np.linalg.norm(e))
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def amplification(port_in: Mapping[str, np.ndarray], ref_in: Mapping[str, np.ndarray],
                  port_out: Mapping[str, np.ndarray], ref_out: Mapping[str, np.ndarray]) -> Amplification:
    """Compare the error at a module's output with the error at its input (shared keys only)."""
    in_err = max((rel_l2(port_in[k], ref_in[k]) for k in ref_in if k in port_in), default=0.0)
    out_err = max((rel_l2(port_out[k], ref_out[k]) for k in ref_out if k in port_out), default=0.0)
    return Amplification.of(in_err, out_err)


@dataclass(frozen=True)
class LayerResult:
    name: str  # reference call name
    port_name: str
    type: str  # reference class name
    forward: Metrics
    backward: Metrics | None  # None: no gradient flows through this module on either side
    tolerance: Tolerance
    ignored_inputs: tuple[str, ...] = ()
    extra_outputs: tuple[str, ...] = ()  # outputs the port returns beyond the reference's (not compared)
    module: str = ""  # module path (the call name without a "#n" repeat suffix)
    amplification: Amplification | None = None  # free-running only

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
            "extra_outputs": list(self.extra_outputs),
            "amplification": None if self.amplification is None else self.amplification.to_dict(),
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
class Culprits:
    """The deepest failing modules: each fails on its own while every module inside it passes."""

    forward: tuple[str, ...]
    backward: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"forward": list(self.forward), "backward": list(self.backward)}


@dataclass(frozen=True)
class RunResult:
    """One dtype in one mode."""

    dtype: str
    mode: str
    tolerance: Tolerance
    policy: str  # the tolerance rule in words
    layers: tuple[LayerResult, ...] = ()
    first_divergence: Divergence = field(default_factory=lambda: Divergence(None, None))
    culprits: Culprits = field(default_factory=lambda: Culprits((), ()))
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
            "culprits": self.culprits.to_dict(),
            "amplifying": list(deepest([layer for layer in self.layers
                                        if layer.amplification and layer.amplification.flagged])),
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

    def unmatched(self, names: list[str]) -> str | None:
        """The first override glob that matches none of `names`."""
        return unmatched(tuple(o.glob for o in self.overrides), names)


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


def _failed(layer: LayerResult, direction: str) -> bool:
    m = layer.forward if direction == FORWARD else layer.backward
    return m is not None and not m.passed


def _inside(child: str, parent: str) -> bool:
    return child != parent and (parent == ROOT or child.startswith(parent + "."))


def culprits(layers: tuple[LayerResult, ...], forward_order: list[str], backward_order: list[str]) -> Culprits:
    """Failing modules none of whose submodules fail, in the same direction.

    Under teacher forcing every module sees the reference's inputs, so a module that fails
    while all of its children pass holds the bug in its own code: a functional attention
    core, a mask built in forward, a loss. Listed in forward (or backward) order.
    """
    found = {}
    for direction, order in ((FORWARD, forward_order), (BACKWARD, backward_order)):
        rank = {n: i for i, n in enumerate(order)}
        names = deepest([layer for layer in layers if _failed(layer, direction)])
        found[direction] = tuple(sorted(names, key=lambda n: rank.get(n, len(rank))))
    return Culprits(found[FORWARD], found[BACKWARD])


def deepest(layers: list[LayerResult]) -> tuple[str, ...]:
    """The layers none of whose submodules are also in `layers` (input order kept)."""
    return tuple(f.name for f in layers if not any(_inside(o.module, f.module) for o in layers))


def mismatch_message(name: str, direction: str, m: Metrics, tol: Tolerance, dtype: str, mode: str,
                     rerun: str = "") -> str:
    """A torch.testing-style account of one failing comparison (and how to rerun just it)."""
    what = "forward output" if direction == FORWARD else "gradient"
    lines = [f"{name}: {what} is not close! ({dtype}, {mode.replace('_', '-')})"]
    if m.note:
        lines.append(m.note)
    if m.numel:
        lines.append(f"Mismatched elements: {m.mismatched} / {m.numel} ({100.0 * m.mismatched / m.numel:.1f}%)")
        lines.append(f"Greatest absolute difference: {m.max_abs:.3g} at {m.worst} (up to {tol.atol:g} allowed)")
        lines.append(f"Greatest relative difference: {m.max_rel:.3g} (up to {tol.rtol:g} allowed)")
        lines.append(f"Cosine {m.cosine:.6f} | smallest passing atol {m.needed_atol:.3g}")
    if rerun:
        lines.append(f"Rerun: {rerun}")
    return "\n".join(lines)


def mean_pooled(outputs: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """The sentence embedding sentence-transformers computes: the mean of the last hidden
    state over each sequence's real (mask = 1) tokens, in float64."""
    h = outputs["last_hidden_state"].astype(np.float64)  # (B, T, H)
    mask = inputs["attention_mask"].astype(np.float64)[..., None]  # (B, T, 1)
    return (h * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)


DERIVED = {"mean_pooled": mean_pooled}


class Collector:
    """A Judge (see align.force) that compares as it is shown tensors and keeps only Metrics,
    grouped by the reference call they count for. With a noise floor, `truth` holds the
    float64 reference's value for each (owner, label), and a failure within it passes."""

    def __init__(self, tolerances: Tolerances, truth: Mapping[str, np.ndarray] | None = None,
                 factor: float | None = None):
        self.tolerances, self.truth, self.factor = tolerances, truth, factor
        self.found: dict[tuple[str, str], list[tuple[str, Metrics]]] = {}

    def compare(self, owner: str, direction: str, label: str, port: np.ndarray, ref: np.ndarray) -> None:
        tol = self.tolerances.for_name(owner)
        m = compare_arrays(port, ref, tol, label)
        if self.factor is not None and self.truth is not None:
            m = within_noise(m, port, ref, self.truth.get(truth_key(owner, label)), tol, self.factor)
        self.found.setdefault((owner, direction), []).append((label, m))

    def fail(self, owner: str, direction: str, label: str, note: str) -> None:
        self.found.setdefault((owner, direction), []).append((label, missing(note, label)))

    def clear(self) -> None:
        """Forget everything seen (the pass is being made again)."""
        self.found = {}

    def absorb(self, other: Collector) -> None:
        """Take over another collector's comparisons (a part judged in a pass of its own)."""
        for key, items in other.found.items():
            self.found.setdefault(key, []).extend(items)

    def get(self, owner: str, direction: str) -> Metrics | None:
        return combine([m for _, m in self.found.get((owner, direction), [])])

    def labelled(self, owner: str, direction: str, prefix: str) -> list[tuple[str, Metrics]]:
        """This owner's comparisons whose label starts with `prefix`, prefix removed."""
        return [(label[len(prefix):], m) for label, m in self.found.get((owner, direction), [])
                if label.startswith(prefix)]


class Keeper:
    """A Judge that keeps (a copy of) what it is shown, as the truth a Collector judges
    against: a judge is shown views that the model may still write to."""

    def __init__(self):
        self.kept: dict[str, np.ndarray] = {}

    def compare(self, owner: str, direction: str, label: str, port: np.ndarray, ref: np.ndarray) -> None:
        self.kept[truth_key(owner, label)] = np.array(port)

    def fail(self, owner: str, direction: str, label: str, note: str) -> None:
        pass

    def clear(self) -> None:
        self.kept = {}


def truth_key(owner: str, label: str) -> str:
    return f"{owner}|{label}"
