"""The results of comparing: per layer, per model output, per parameter gradient, per run.

Pure numpy. Everything here is a frozen dataclass with to_dict(); nothing prints.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field

from align.capture.trace import ROOT
from align.compare.metrics import Metrics
from align.registry.spec import Override, Tolerance, unmatched

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
    reached: bool = True  # False: never run, because the port raised before it (never a culprit)
    # False: the port ran past it without calling it. Its caller's code is what is wrong (see
    # diagnose.culprits.uncalled), or, if its caller passes without it, nothing is.
    called: bool = True
    # inputs the port passed that are another tensor than the reference's (other sizes): this
    # module was not judged on the reference's input, so its caller's code is suspect first
    foreign_inputs: tuple[str, ...] = ()

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
            "reached": self.reached,
            "called": self.called,
            "foreign_inputs": list(self.foreign_inputs),
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
    # culprit -> the children it did not call (the reference's does): why its forward is wrong
    uncalled: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"forward": list(self.forward), "backward": list(self.backward),
                "uncalled": {k: list(v) for k, v in self.uncalled.items()}}


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


def _inside(child: str, parent: str) -> bool:
    return child != parent and (parent == ROOT or child.startswith(parent + "."))


def deepest(layers: list[LayerResult]) -> tuple[str, ...]:
    """The layers none of whose submodules are also in `layers` (input order kept)."""
    return tuple(f.name for f in layers if not any(_inside(o.module, f.module) for o in layers))
