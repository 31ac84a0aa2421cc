"""The Report: everything report.json holds, with its schema version and its verdict.
Renderers read the JSON, never this object."""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Iterator
from typing import Any

from align.compare.metrics import Metrics

from align.compare.keep import KeptTensor
from align.compare.pair import Unpaired
from align.compare.results import RunResult, TensorResult
from align.diagnose.findings import Finding
from align.diagnose.observer import Observer
from align.diagnose.repro import ReproCase
from align.registry.spec import Tolerance
from align.weights.plan import WeightMap

SCHEMA_VERSION = 3
# Every key report.json holds at its top level (Report.to_dict).
TOP_LEVEL_KEYS = ("schema_version", "verdict", "problems", "judged_by", "model", "config", "port", "weights_from",
                  "only", "path", "shell_judged", "created", "command", "checkpoint", "first_divergence", "culprits",
                  "runs", "outputs", "param_grads", "input_grads", "weights", "unpaired", "findings", "observer",
                  "warnings", "repro", "kept", "env")


@dataclass(frozen=True)
class Report:
    """Everything report.json holds; renderers read the JSON, never this object."""

    model: str
    config: str
    port: str  # the port class ("module:Class")
    runs: tuple[RunResult, ...]
    outputs: tuple[TensorResult, ...]
    param_grads: tuple[TensorResult, ...]
    weights: WeightMap
    unpaired: tuple[Unpaired, ...]
    env: dict[str, Any]
    command: str
    created: str
    checkpoint: str | None = None
    findings: tuple[Finding, ...] = ()
    observer: tuple[Observer, ...] = ()
    dtypes: dict[str, dict] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    repro: ReproCase | None = None  # tensors for the first culprit; written by the CLI, not JSON
    kept: tuple[KeptTensor, ...] = ()  # what --keep asked for; written by the CLI, not JSON
    weights_from: str = "rules"  # or "pretrained": the port's own loader, checked against the rules
    only: tuple[str, ...] = ()  # the report limited to these module globs (a partial check)
    path: str = "full"  # or "gate": teacher forcing only, no free-running run and no observer runs
    # False for a streamed --only run that chose no module outside the blocks: the shell was not
    # run, so there are no model outputs and only the chosen blocks' parameter gradients.
    shell_judged: bool = True
    input_grads: tuple[TensorResult, ...] = ()  # input:NAME, the gradients the model sends back to its inputs
    judging: str = "float64"  # ModelSpec.judging: "float64", "strict" or "literal"

    @property
    def verdict(self) -> str:
        if not any(r.status == "ran" for r in self.runs):
            return "error"
        return "fail" if self.problems() else "pass"

    def problems(self) -> list[str]:
        """Why the port is not aligned, one line each (none: aligned). Empty is failure: a run
        that compared nothing, or a model whose outputs were never compared, fails with that."""
        out = []
        for r in self.runs:
            if r.status == "ran" and r.gated and not r.layers:
                out.append(f"{r.dtype} {r.mode.replace('_', '-')}: no module was compared")
            elif r.status == "ran" and r.gated and not r.passed:
                bad = [layer.name for layer in r.layers if not layer.passed]
                out.append(f"{r.dtype} {r.mode.replace('_', '-')}: {len(bad)} of {len(r.layers)} modules not "
                           f"close, first {bad[0]}")
        if self.shell_judged and not self.outputs:
            out.append("no model output was compared")
        for kind, items in (("model output", self.outputs), ("parameter gradient", self.param_grads),
                            ("input gradient", self.input_grads)):
            bad = [t.name for t in items if not t.passed]
            if bad:
                out.append(f"{len(bad)} {kind}(s) not close, first {bad[0]}")
        if self.shell_judged and not (self.param_grads or self.input_grads) and self.weights.written():
            out.append("no gradient was compared: the backward reached no parameter and no input")
        out += [f"unpaired {u.side} module {u.name}: {u.reason}" for u in self.unpaired if not u.allowed]
        out += [f.message for f in self.findings if f.fails]
        if not self.weights.all_exact:
            out.append("the port's weights are not the reference's: " + (
                ", ".join(f"{e.source} -> {e.target}" for e in self.weights.entries if e.exact is False)
                or "none was loaded"))
        return out

    def _fp32_judged(self) -> Iterator[tuple[str, Metrics, Tolerance]]:
        """Every fp32 comparison the verdict rests on, named as a reader finds it."""
        for r in self.runs:
            if r.status == "ran" and r.gated and r.dtype == "float32":
                for layer in r.layers:
                    yield f"{layer.name} (forward)", layer.forward, layer.tolerance
                    if layer.backward is not None:
                        yield f"{layer.name} (backward)", layer.backward, layer.tolerance
        for kind, items in (("output", self.outputs), ("param grad", self.param_grads),
                            ("input grad", self.input_grads)):
            for t in items:
                yield f"{kind} {t.name}", t.metrics, t.tolerance

    def judged_by(self) -> dict:
        """Which rule judged fp32, and the literal figure whatever judged: the comparison furthest
        from the literal tolerance (the smallest atol it would pass at its rtol), its allowance and
        the headroom (allowance / needed: below 1, the literal rule alone would fail it), and what
        the float64 truth let pass."""
        judged = list(self._fp32_judged())
        worst = max(judged, key=lambda j: j[1].needed_atol, default=None)
        literal = None
        if worst is not None:
            name, m, tol = worst
            literal = {"needed_atol": m.needed_atol, "where": name, "atol": tol.atol, "rtol": tol.rtol,
                       "headroom": None if m.needed_atol == 0 else tol.atol / m.needed_atol,
                       "met": all(j[1].needed_atol <= j[2].atol for j in judged)}
        return {"rule": self.judging, "literal": literal,
                "passed_by_truth": [name for name, m, _ in judged if m.passed and m.rule == "floor"]}

    def _first_gated(self, attr: str, nothing: Any) -> dict:
        """`attr` (first_divergence or culprits) of the first gated run that has any."""
        for r in self.runs:
            found = getattr(r, attr)
            if r.gated and r.status == "ran" and (found.forward or found.backward):
                return {"dtype": r.dtype, "mode": r.mode, **found.to_dict()}
        return {"dtype": None, "mode": None, "forward": nothing, "backward": nothing}

    def first_divergence(self) -> dict:
        return self._first_gated("first_divergence", None)

    def culprits(self) -> dict:
        return self._first_gated("culprits", [])

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "verdict": self.verdict,
            "problems": self.problems(),
            "judged_by": self.judged_by(),
            "model": self.model,
            "config": self.config,
            "port": self.port,
            "weights_from": self.weights_from,
            "only": list(self.only),
            "path": self.path,
            "shell_judged": self.shell_judged,
            "created": self.created,
            "command": self.command,
            "checkpoint": self.checkpoint,
            "first_divergence": self.first_divergence(),
            "culprits": self.culprits(),
            "runs": [r.to_dict() for r in self.runs],
            "outputs": [o.to_dict() for o in self.outputs],
            "param_grads": [p.to_dict() for p in self.param_grads],
            "input_grads": [g.to_dict() for g in self.input_grads],
            "weights": [e.to_dict() for e in self.weights.entries],
            "unpaired": [u.to_dict() for u in self.unpaired],
            "findings": [f.to_dict() for f in self.findings],
            "observer": [o.to_dict() for o in self.observer],
            "warnings": list(self.warnings),
            "repro": None,
            "kept": None,
            "env": {**self.env, "dtypes": self.dtypes},
        }
