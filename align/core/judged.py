"""What every schedule shares once the port is forced on the reference's record: the results
of each forced pass (the whole model in memory; each block, then the shell, when streamed),
gathered into one teacher-forced RunResult with the parameter gradients and model outputs
those passes saw and the unpaired modules the rules allow."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

import numpy as np

from align import weights as W
from align.capture.force import Forcer, Judge
from align.capture.hooks import ModelRaised
from align.capture.trace import BACKWARD, FORWARD, PARAMETER_GRAD, ROOT, Call
from align.compare.judges import Collector
from align.compare.keep import KeptTensor, TensorKeeper, keeping
from align.compare.metrics import missing
from align.compare.pair import Pair, Unpaired
from align.compare.results import TEACHER_FORCED, LayerResult, RunResult, TensorResult, Tolerances
from align.diagnose.culprits import culprits, first_divergence, uncalled
from align.errors import one_line
from align.registry.spec import ModelSpec, matches

Progress = Callable[[str], None]

FORCED_TWICE = ("the forced pass ran twice: a port value reaches another module's code by a way no module "
                "boundary shows (an attribute?), so its stretches could not run backward one by one")


def selected(module: str, only: tuple[str, ...]) -> bool:
    """Whether a module is among the --only globs (all modules when there are none)."""
    return not only or matches(module, only)


def tolerance_policy(spec: ModelSpec) -> str:
    """The fp32 rule in words: the literal one, then the float64 truth's (or why there is none)."""
    if spec.noise_floor is None:
        return spec.tolerance.describe() + "; the literal rule alone: the reference has no float64 path (float64 = false)"
    return f"{spec.tolerance.describe()}; {spec.noise_floor.describe()}"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def as_reference(port_grads: dict[str, np.ndarray], wmap: W.WeightMap) -> dict[str, np.ndarray]:
    """Port parameter grads renamed and laid out as the reference's (a transposed Linear
    weight's grad is transposed back, a split one's parts joined). A parameter with no
    reference counterpart keeps its name, marked."""
    out, left = wmap.to_reference(port_grads)
    return out | {f"{key} (port only)": port_grads[key] for key in left}


def allowed(unpaired: Iterable[Unpaired], rules: W.Rules) -> list[Unpaired]:
    """Unpaired modules, those the rules say have no counterpart by design marked allowed."""
    return [u if not (why := rules.unpaired_reason(u.name.split("#")[0]))
            else Unpaired(u.name, u.side, f"{why} ({rules.source.name})", allowed=True) for u in unpaired]


def _notes(notes: Any) -> tuple[str, ...]:
    return tuple(notes.ignored) + tuple(f"{k}: kept the port's own" for k in notes.kept)


def forced_layers(pairs: list[Pair], ref_calls: dict[str, Call], forced: Forcer, judged: Collector,
                  tolerances: Tolerances, raised: ModelRaised | None = None) -> list[LayerResult]:
    """One LayerResult per pair, from what a forced pass showed `judged`. If the port raised
    (`raised`), the call it raised in fails with the exception, and the modules the pass
    never reached are marked so (no culprit: they only come after it)."""
    layers = []
    where = _raised_in(pairs, forced, raised)
    for p in pairs:
        call = ref_calls[p.ref]
        tol = tolerances.for_name(p.ref)
        notes = forced.notes.get(p.ref)
        if p.ref == where:
            error = f"the port raised {type(raised.error).__name__}: {one_line(raised.error)}"
            layers.append(LayerResult(p.ref, p.port, call.type, missing(error), None, tol, module=p.ref_module))
            continue
        if notes is None:
            why = f"not reached: the port raised in {raised.module} first" if raised else "the port never called this module"
            layers.append(LayerResult(p.ref, p.port, call.type, missing(why), None, tol, module=p.ref_module,
                                      reached=raised is None, called=False))
            continue
        layers.append(LayerResult(p.ref, p.port, call.type,
                                  judged.get(p.ref, FORWARD) or missing("the module returned no tensor"),
                                  judged.get(p.ref, BACKWARD), tol, _notes(notes), tuple(notes.extra),
                                  module=p.ref_module, foreign_inputs=tuple(notes.foreign)))
    return layers


def _raised_in(pairs: list[Pair], forced: Forcer, raised: ModelRaised | None) -> str | None:
    """The reference name of the call the port raised in: the last one entered of its module."""
    if raised is None:
        return None
    entered = [p.ref for p in pairs if p.port_module == raised.module and p.ref in forced.notes]
    return entered[-1] if entered else None


class Judgement:
    """The teacher-forced judgement of one port in one dtype, made in one forced pass or in
    several (each a part of the model), and gathered: the modules judged, the parameter
    gradients and model outputs the passes saw, the unpaired modules, the kept tensors."""

    def __init__(self, spec: ModelSpec, rules: W.Rules, dtype: str, only: tuple[str, ...] = (),
                 keep: tuple[str, ...] = (), input_names: dict[str, str] | None = None):
        self.spec, self.rules, self.dtype, self.only, self.keep = spec, rules, dtype, only, keep
        self.input_names = input_names or {}  # the reference's name of an input -> the recipe's
        self.tolerances = Tolerances(spec.tolerance, spec.overrides)
        self.factor = spec.noise_floor.factor if spec.noise_floor else None
        self.strict = bool(spec.noise_floor and spec.noise_floor.strict)
        self.layers: list[LayerResult] = []
        self.outputs: list[TensorResult] = []
        self.param_grads: list[TensorResult] = []
        self.input_grads: list[TensorResult] = []  # input:NAME, the gradients the model sends its inputs
        self.unpaired: list[Unpaired] = []
        self.raised: ModelRaised | None = None  # the port raised in a pass
        self.twice = False  # some pass was made again with one backward (see force.eager_or_once)
        self._keepers: list[TensorKeeper] = []

    def judge(self, truth: dict[str, np.ndarray] | None = None, mode: str = TEACHER_FORCED) -> tuple[Collector, Judge]:
        """A Collector for one pass (judging, under a noise floor, against `truth`) and the
        judge to show that pass: the collector, teamed with a TensorKeeper for --keep."""
        collector = Collector(self.tolerances, truth, self.factor, self.strict)
        judge, keeper = keeping(collector, self.keep, self.dtype, mode)
        self._keepers += [keeper] if keeper else []
        return collector, judge

    def record(self, judged: Collector, forcer: Forcer, pairs: list[Pair], calls: dict[str, Call],
               unpaired: Iterable[Unpaired] = (), model: bool = False, raised: ModelRaised | None = None) -> None:
        """What one forced pass judged: its modules (those --only chose), the parameter
        gradients it saw and, for a pass that ran the model itself, the model's outputs and
        the gradients it sent back to its inputs. `raised`: the port raised in that pass."""
        tol = self.tolerances.for_name
        self.twice = self.twice or not forcer.eager
        self.raised = self.raised or raised
        self.layers += forced_layers([p for p in pairs if selected(p.ref_module, self.only)], calls, forcer, judged,
                                     self.tolerances, raised)
        self.param_grads += [TensorResult(k, m, tol(k)) for owner in forcer.first_calls.values()
                             for k, m in judged.labelled(owner, BACKWARD, PARAMETER_GRAD)]
        if model:
            self.outputs += [TensorResult(k, m, tol(k)) for k, m in judged.labelled(ROOT, FORWARD, "output ")]
            self.input_grads += [TensorResult(self.input_name(path), m, tol(self.input_name(path)))
                                 for path, m in judged.labelled(ROOT, BACKWARD, "grad of input ")]
        self.unpaired += allowed(unpaired, self.rules)

    def input_name(self, path: str) -> str:
        """How the report names the gradient sent back to an input: input:NAME, NAME the recipe's."""
        return f"input:{self.input_names.get(path, path)}"

    def missing_grads(self, graded: Iterable[str]) -> None:
        """Every reference parameter that got a gradient and the passes never saw: a failure."""
        seen = {r.name for r in self.param_grads}
        self.param_grads += [TensorResult(k, missing("the port parameter got no gradient", k),
                                          self.tolerances.for_name(k)) for k in sorted(set(graded) - seen)]

    def run(self, policy: str, forward_order: list[str], backward_order: list[str]) -> RunResult:
        layers = uncalled(tuple(self.layers))
        return RunResult(self.dtype, TEACHER_FORCED, self.spec.tolerance, policy, layers,
                         first_divergence(layers, forward_order, backward_order),
                         culprits(layers, forward_order, backward_order), gated=True)

    @property
    def kept(self) -> list[KeptTensor]:
        return [k for keeper in self._keepers for k in keeper.kept]

    @property
    def warnings(self) -> list[str]:
        return [FORCED_TWICE] if self.twice else []
