"""The orchestrator: spec -> build -> weights -> capture -> pair -> compare -> Report.

Each step is one call into the module that owns it; this file only joins them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from align import weights as W
from align.capture import ROOT, Arr, Trace, float_inputs, flatten, run_and_record
from align.compare import (
    FREE_RUNNING,
    TEACHER_FORCED,
    LayerResult,
    RunResult,
    TensorResult,
    Tolerances,
    DERIVED,
    amplification,
    compare_named,
    culprits,
    first_divergence,
)
from align.diagnose import Finding, Observer, dtype_table, environment_warnings, observer_check
from align.metrics import combine, compare_arrays, missing, within_noise
from align.pair import Pairing, Unpaired, pair_calls
from align.replay import Local, Unreplayable, run_local
from align.repro import ReproCase
from align.spec import ConfigError, ModelSpec

SCHEMA_VERSION = 1
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Report:
    """Everything report.json holds; renderers read the JSON, never this object."""

    model: str
    config: str
    port: str  # the port class ("module:Class")
    runs: tuple[RunResult, ...]
    outputs: tuple[TensorResult, ...]
    param_grads: tuple[TensorResult, ...]
    weights: W.WeightMap
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
    weights_from: str = "rules"  # or "pretrained": the port's own loader, checked against the rules
    only: tuple[str, ...] = ()  # teacher forcing limited to these module globs (a partial check)

    @property
    def verdict(self) -> str:
        ran = [r for r in self.runs if r.status == "ran"]
        if not ran:
            return "error"
        gated = [r for r in ran if r.gated]
        ok = (
            all(r.passed for r in gated)
            and bool(self.outputs) and all(o.passed for o in self.outputs)
            and bool(self.param_grads) and all(p.passed for p in self.param_grads)
            and not any(not u.allowed for u in self.unpaired)
            and not any(f.fails for f in self.findings)
            and self.weights.all_exact
        )
        return "pass" if ok else "fail"

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
            "model": self.model,
            "config": self.config,
            "port": self.port,
            "weights_from": self.weights_from,
            "only": list(self.only),
            "created": self.created,
            "command": self.command,
            "checkpoint": self.checkpoint,
            "first_divergence": self.first_divergence(),
            "culprits": self.culprits(),
            "runs": [r.to_dict() for r in self.runs],
            "outputs": [o.to_dict() for o in self.outputs],
            "param_grads": [p.to_dict() for p in self.param_grads],
            "weights": [e.to_dict() for e in self.weights.entries],
            "unpaired": [u.to_dict() for u in self.unpaired],
            "findings": [f.to_dict() for f in self.findings],
            "observer": [o.to_dict() for o in self.observer],
            "warnings": list(self.warnings),
            "repro": None,
            "env": {**self.env, "dtypes": self.dtypes},
        }


def bf16_unavailable() -> str:
    """Why bf16 is not run here, in words for the report."""
    from align.paddle_side import paddle

    try:
        a = paddle.ones([2, 2], dtype="bfloat16")
        paddle.matmul(a, a)
    except Exception as e:  # paddle raises its own NotFoundError family
        first = str(e).strip().splitlines()[0][:200]
        return f"Paddle {paddle.__version__} on {paddle.device.get_device()} has no bfloat16 kernels: {first}"
    # Honest until the bf16 comparison exists: never a silent pass on a capable backend either.
    return (f"Paddle {paddle.__version__} on {paddle.device.get_device()} has bfloat16 kernels, "
            "but this version of align does not yet run the bf16 comparison")


def _seed(fw, spec: ModelSpec) -> Callable[[Any], Any]:
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


def _plan(rules: W.Rules, source: dict[str, np.ndarray], port: Any, config: dict) -> W.WeightMap:
    owners = dict(port.named_sublayers(include_self=True))
    return W.plan(rules, {k: v.shape for k, v in source.items()}, W.describe_slots(port.state_dict(), owners),
                  config, same=lambda a, b: W.same_bytes(source[a], source[b]))


def _load_weights(rules: W.Rules, source: dict[str, np.ndarray], port: Any, ps: Any, config: dict) -> W.WeightMap:
    """Plan, convert, load and verify bit-exact: the port gets the reference's weights."""
    port_state = port.state_dict()
    wmap = _plan(rules, source, port, config)
    for key, arr in W.convert(wmap, source).items():
        port_state[key].set_value(arr)
    return W.verify(wmap, source, lambda k: ps.record(port_state[k]).data)


@dataclass
class ReferenceRun:
    """The reference's half of an alignment, framework-free: what `align trace` writes and
    `align check` reads. Nothing in it needs torch to be used."""

    model: str
    config_name: str
    config: dict[str, Any]  # the reference config's values, from which the port is built
    fingerprint: str  # of the registry's config (and rules) the run was made with
    inputs: dict[str, Arr]
    trace: Trace
    locals: dict[str, Local | str]  # per call: the reference module's own replay, or why it has none
    weights: dict[str, np.ndarray]  # the reference's state dict
    dtypes: dict[str, str]  # every reference parameter and buffer
    observer: Observer
    env: dict[str, Any]
    checkpoint: str | None
    created: str
    fp64: ReferenceRun | None = None  # the same run in float64, when the model judges fp32 by its noise floor
    only: tuple[str, ...] = ()  # module globs the replays were limited to (--only); empty: every module


def fingerprint(spec: ModelSpec, config: str) -> str:
    """What a trace must match: the model, the config's values and the weight rules."""
    import hashlib
    import json

    from align.build import config_values

    values, _, _ = config_values(spec, config)
    blob = json.dumps({"model": spec.name, "config": values, "rules": spec.weights_file.read_text(),
                       "inputs": repr(spec.inputs), "init": repr(spec.init)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def selected(module: str, only: tuple[str, ...]) -> bool:
    """Whether a module is among the --only globs (all modules when there are none)."""
    import fnmatch

    return not only or any(fnmatch.fnmatchcase(module, g) for g in only)


def run_reference(spec: ModelSpec, config: str | None = None, checkpoint: Path | None = None,
                  progress: Progress = lambda s: None, only: tuple[str, ...] = (), sink: Any = None) -> ReferenceRun:
    """Run only the reference (torch): record every module, replay each (or each matching an
    `only` glob) on its own inputs.

    With a `sink` (a trace_io.TraceWriter), each call is written the moment its replay is
    done and its tensors are dropped, so memory does not hold the whole trace; the returned
    run then keeps the run-level record but no per-call tensors.
    """
    from align import build
    from align.diagnose import reference_environment
    from align.spec import resolve_path
    from align.torch_side import TorchSide

    config = config or spec.default_config
    if checkpoint is None and config in spec.checkpoints:
        checkpoint = resolve_path(spec.checkpoints[config], spec.source)
    ts = TorchSide()
    rules = W.load_rules(spec.weights_file)
    cfg = build.reference_config(spec, config)
    progress("building the reference")
    ref = build.build_reference(spec, cfg, checkpoint, ignore=rules.ignored)
    inputs = build.make_inputs(spec, cfg)
    ref_inputs = {k: ts.tensor(a, False) for k, a in inputs.items()}
    progress("running the reference with hooks")
    trace = run_and_record(ts, ref, ref_inputs, _seed(ts, spec), keep_inputs=True)
    observer = observer_check(ts, ref, ref_inputs, _seed(ts, spec), trace)
    progress(f"replaying {len(trace.calls)} reference modules on their own inputs")
    locals_: dict[str, Local | str] = {}
    if only and not any(selected(c.module, only) for c in trace.calls.values()):
        raise ConfigError(spec.source, f"models.{spec.name}", f"--only {' '.join(only)} matches no module of the reference")
    # The float64 run replays the recorded calls too, so it goes before a sink drops them.
    fp64 = _fp64_run(spec, ts, ref, inputs, trace, progress, only) if spec.noise_floor else None
    for name, call in trace.calls.items():
        local: Local | str | None = None
        if selected(call.module, only):
            try:
                local = run_local(ts, ref, call.module, call, filter_kwargs=False)
            except Unreplayable as e:
                local = str(e)
        if sink is None:
            if local is not None:
                locals_[name] = local
            continue
        sink.add(name, call, local)
        call.args, call.kwargs, call.outputs, call.grads = (), {}, {}, {}
    return ReferenceRun(
        model=spec.name, config_name=config, config=cfg.to_dict(), fingerprint=fingerprint(spec, config),
        inputs=inputs, trace=trace, locals=locals_, fp64=fp64, only=tuple(only),
        weights={k: ts.record(v).data for k, v in ref.state_dict().items()},
        dtypes={k: ts.dtype_name(t) for k, t in {**ts.parameters(ref), **ts.buffers(ref)}.items()},
        observer=observer, env=reference_environment(),
        checkpoint=None if checkpoint is None else str(checkpoint),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _as_fp64(obj: Any) -> Any:
    """A recorded structure with its fp32 tensors widened to fp64 (others unchanged)."""
    if isinstance(obj, Arr):
        return Arr(obj.data.astype(np.float64), "float64", obj.requires_grad) if obj.dtype == "float32" else obj
    if isinstance(obj, dict):
        return {k: _as_fp64(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        items = [_as_fp64(v) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    return obj


def _fp64_run(spec: ModelSpec, ts: Any, ref: Any, inputs: dict[str, Arr], trace: Trace,
              progress: Progress, only: tuple[str, ...] = ()) -> ReferenceRun:
    """The reference again in float64: its whole run, and each module replayed on the fp32
    run's recorded inputs (widened), seeded with the fp32 run's output gradients (widened).
    What an exact computation would give, to measure fp32 noise against."""
    import copy

    progress("running the reference again in float64 (noise floor)")
    ref64 = copy.deepcopy(ref).double()
    run64 = run_and_record(ts, ref64, {k: ts.tensor(a, False) for k, a in _as_fp64(inputs).items()},
                           _seed(ts, spec), keep_inputs=False)
    locals64: dict[str, Local | str] = {}
    for name, call in trace.calls.items():
        if not selected(call.module, only):
            continue
        widened = dataclasses.replace(call, args=_as_fp64(call.args), kwargs=_as_fp64(call.kwargs),
                                      grads={p: g.astype(np.float64) for p, g in call.grads.items()})
        try:
            locals64[name] = run_local(ts, ref64, call.module, widened, filter_kwargs=False)
        except Unreplayable as e:
            locals64[name] = str(e)
    return ReferenceRun(model=spec.name, config_name="fp64", config={}, fingerprint="", inputs={}, trace=run64,
                        locals=locals64, weights={}, dtypes={}, observer=Observer("torch", True, True, ()),
                        env={}, checkpoint=None, created="")


def align_model(spec: ModelSpec, config: str | None = None, dtypes: tuple[str, ...] | None = None,
                checkpoint: Path | None = None, progress: Progress = lambda s: None,
                command: str = "", only: tuple[str, ...] = ()) -> Report:
    """Align one model in one process: the reference's half, then the port's.

    `config` defaults to the model's default_config, and `checkpoint` to the one align.toml
    names for that config (if any).
    """
    return check_port(spec, run_reference(spec, config, checkpoint, progress, only), dtypes, progress, command)


def check_port(spec: ModelSpec, ref: ReferenceRun, dtypes: tuple[str, ...] | None = None,
               progress: Progress = lambda s: None, command: str = "", weights_from: str = "rules") -> Report:
    """Run only the port (Paddle) against a ReferenceRun, and judge it. Never imports torch.

    weights_from="rules" loads the port's weights with align's weight rules; "pretrained"
    lets the port's own loader (from_pretrained) convert the reference's checkpoint, and then
    checks every tensor it produced against what the rules say it should be.
    """
    from align import build
    from align.diagnose import environment, port_environment
    from align.paddle_side import PaddleSide

    ps = PaddleSide()
    rules = W.load_rules(spec.weights_file)
    loader_findings = []
    if weights_from == "pretrained":
        progress("loading the port with its own from_pretrained")
        port = build.load_port_pretrained(spec, ref.config, ref.weights)
        wmap = _plan(rules, ref.weights, port, ref.config)
        port_state = port.state_dict()
        wmap = W.verify(wmap, ref.weights, lambda k: ps.record(port_state[k]).data, strict=False)
        loader_findings = [Finding("loader_mismatch", e.source,
                                   f"{e.source} -> {e.target}: the port's own loader gives a different tensor "
                                   f"than the rules ({e.rule})", fails=True)
                           for e in wmap.entries if e.exact is False]
    else:
        progress("building the port")
        port = build.build_port_from(spec, ref.config)
        progress("mapping weights")
        wmap = _load_weights(rules, ref.weights, port, ps, ref.config)

    def to_port(key: str) -> str | None:
        for e in wmap.entries:
            if key in e.sources:
                return e.targets[0] if len(e.targets) == 1 and e.transform != "merge" else None
        return rules.rename(key)[0]

    port_dtypes = {k: ps.dtype_name(t) for k, t in {**ps.parameters(port), **ps.buffers(port)}.items()}
    dtypes_seen, findings = dtype_table(ref.dtypes, port_dtypes, to_port)
    findings = list(findings) + loader_findings
    env = environment(ref.env, port_environment(), {"init": spec.init.seed, "inputs": spec.inputs.seed})
    warnings = environment_warnings(env)

    tolerances = Tolerances(spec.tolerance, spec.overrides)
    ref_trace = ref.trace
    noise = spec.noise_floor
    if noise and ref.fp64 is None:
        raise ConfigError(spec.source, f"models.{spec.name}.tolerance.noise_floor",
                          "the trace has no float64 run of the reference; trace it again")
    policy = spec.tolerance.describe() + (f"; {noise.describe()}" if noise else "")
    runs: list[RunResult] = []
    outputs: tuple[TensorResult, ...] = ()
    param_grads: tuple[TensorResult, ...] = ()
    unpaired: tuple[Unpaired, ...] = ()
    observers: list[Observer] = [ref.observer]
    repro: ReproCase | None = None
    for dtype in dtypes or spec.dtypes:
        if dtype == "bfloat16":
            reason = bf16_unavailable()
            for mode in (TEACHER_FORCED, FREE_RUNNING):
                runs.append(RunResult(dtype, mode, spec.tolerance, spec.bf16.describe(),
                                      status="not_run", reason=reason, gated=mode == TEACHER_FORCED))
            warnings.append(f"bfloat16 was NOT run: {reason}")
            continue

        port_inputs = {**{k: ps.tensor(a, False) for k, a in _port_inputs(ref.inputs, spec).items()},
                       **_call_kwargs_for(spec, ROOT)}
        progress(f"{dtype}: running the port with hooks")
        port_trace = run_and_record(ps, port, port_inputs, _seed(ps, spec), keep_inputs=True)
        progress(f"{dtype}: checking that hooks change nothing")
        observers = [ref.observer, observer_check(ps, port, port_inputs, _seed(ps, spec), port_trace)]
        for o in observers:
            if not (o.outputs_identical and o.grads_identical):
                msg = (f"observer effect: the {o.framework} model's outputs or gradients differ with hooks "
                       f"installed ({', '.join(o.differing[:5])})")
                warnings.append(msg)
                findings.append(Finding("observer_effect", o.framework, msg, fails=False))

        pairing = pair_calls(
            [(n, c.module) for n, c in ref_trace.calls.items()],
            {ROOT} | {n for n, _ in port.named_sublayers()},
            rules.rename_module,
            [(n, c.module) for n, c in port_trace.calls.items()],
        )
        unpaired = tuple(u if not (why := rules.unpaired_reason(u.name.split("#")[0]))
                         else Unpaired(u.name, u.side, f"{why} ({rules.source.name})", allowed=True)
                         for u in pairing.unpaired)
        names = [p.ref for p in pairing.pairs] + list(ref_trace.param_grads)
        bad_globs = tolerances.unmatched(names)
        if bad_globs:
            raise ConfigError(spec.source, f"models.{spec.name}.tolerance.overrides",
                              f"glob {bad_globs[0]!r} matches no module or parameter")

        progress(f"{dtype}: teacher-forced replay of {len(pairing.pairs)} modules")
        # Teacher forcing covers the modules the reference replayed: all, or those --only selected.
        replayed = Pairing(tuple(p for p in pairing.pairs if p.ref in ref.locals), pairing.unpaired)
        tf_layers = tuple(_teacher_forced(ps, port, ref, replayed, wmap, tolerances, spec))
        fr_layers = tuple(_free_running(ref, port_trace, pairing, tolerances, spec))
        fwd_order = ref_trace.completion_order()
        bwd_order = ref_trace.start_order()[::-1]
        for mode, layers in ((TEACHER_FORCED, tf_layers), (FREE_RUNNING, fr_layers)):
            runs.append(RunResult(dtype, mode, spec.tolerance, policy, layers,
                                  first_divergence(layers, fwd_order, bwd_order),
                                  culprits(layers, fwd_order, bwd_order), gated=mode == TEACHER_FORCED))
        def judged(name: str, port_arr: np.ndarray, ref_arr: np.ndarray, truth: np.ndarray | None) -> TensorResult:
            tol = tolerances.for_name(name)
            m = compare_arrays(port_arr, ref_arr, tol, name)
            return TensorResult(name, within_noise(m, port_arr, ref_arr, truth, tol, noise.factor) if noise else m, tol)

        truth_out = {k: a.data for k, a in ref.fp64.trace.outputs.items()} if noise else {}
        outputs = tuple(
            judged(k, port_trace.outputs[k].data, a.data, truth_out.get(k)) if k in port_trace.outputs
            else TensorResult(k, missing(f"the port returned no {k!r}", k), tolerances.for_name(k))
            for k, a in ref_trace.outputs.items()
        )
        input_arrays = {k: a.data for k, a in ref.inputs.items()}
        for name in spec.inputs.derived:
            fn = DERIVED[name]
            ref_out = fn({k: a.data for k, a in ref_trace.outputs.items()}, input_arrays)
            port_out = fn({k: a.data for k, a in port_trace.outputs.items()}, input_arrays)
            outputs += (judged(f"{name} (derived)", port_out, ref_out, fn(truth_out, input_arrays) if noise else None),)
        param_grads = _param_grads(ref, port_trace, wmap, tolerances, spec)
        tf_culprits = culprits(tf_layers, fwd_order, bwd_order)
        first = (tf_culprits.forward or tf_culprits.backward or (None,))[0]
        if first is not None and repro is None and isinstance(ref.locals.get(first), Local):
            pair = next(p for p in pairing.pairs if p.ref == first)
            prefix = "" if pair.ref_module == ROOT else pair.ref_module + "."
            module_weights = {k[len(prefix):]: v for k, v in ref.weights.items() if k.startswith(prefix)}
            repro = ReproCase.make(spec, ref.config, pair, ref_trace.calls[first], ref.locals[first], module_weights,
                                   ps, port, tolerances.for_name(first), wmap)

    return Report(
        model=spec.name, config=ref.config_name, port=spec.port_class, weights_from=weights_from,
        runs=tuple(runs), outputs=outputs,
        param_grads=param_grads, weights=wmap, unpaired=unpaired, env=env,
        command=command or f"align run {spec.name}",
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        only=ref.only, checkpoint=ref.checkpoint, findings=tuple(findings),
        observer=tuple(observers), dtypes=dtypes_seen, warnings=tuple(warnings), repro=repro,
    )


def _call_kwargs_for(spec: ModelSpec, module: str) -> dict[str, Any]:
    """The extra keywords the registry asks for when calling this (reference-named) module."""
    import fnmatch

    out: dict[str, Any] = {}
    for glob, kwargs in spec.port_call_kwargs.items():
        if fnmatch.fnmatchcase(module, glob):
            out.update(kwargs)
    return out


def _port_inputs(values: dict[str, Any], spec: ModelSpec) -> dict[str, Any]:
    """The model inputs as the port takes them. With port.labels = "shifted", causal-LM labels
    are handed over already shifted (position t holds the label of t + 1), for ports whose
    loss does not shift them itself; both sides then score the same targets."""
    labels = values.get("labels")
    if spec.port_labels != "shifted" or not isinstance(labels, Arr):
        return values
    shifted = np.concatenate([labels.data[:, 1:], np.full_like(labels.data[:, :1], -100)], axis=1)
    return {**values, "labels": Arr(shifted, labels.dtype)}


def _qualified(module: str, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Direct-parameter names ("weight") -> full keys ("model.norm.weight")."""
    return {(k if module == ROOT else f"{module}.{k}"): g for k, g in grads.items()}


def _as_reference(port_grads: dict[str, np.ndarray], wmap: W.WeightMap) -> dict[str, np.ndarray]:
    """Port parameter grads renamed and laid out as the reference's (a transposed Linear
    weight's grad is transposed back). A port-only parameter keeps its name, marked."""
    out = {}
    for key, g in port_grads.items():
        try:
            out.update(wmap.to_reference(key, g))
        except KeyError:
            out[f"{key} (port only)"] = g
    return out


def _teacher_forced(ps, port, ref: ReferenceRun, pairing: Pairing, wmap: W.WeightMap,
                    tolerances: Tolerances, spec: ModelSpec) -> list[LayerResult]:
    layers = []
    for p in pairing.pairs:
        call = ref.trace.calls[p.ref]
        tol = tolerances.for_name(p.ref)
        ref_local = ref.locals[p.ref]
        try:
            if isinstance(ref_local, str):
                raise Unreplayable(f"(the reference cannot replay it either) {ref_local}")
            port_call = call if p.ref != ROOT else dataclasses.replace(call, kwargs=_port_inputs(call.kwargs, spec))
            port_local = run_local(ps, port, p.port_module, port_call, filter_kwargs=True,
                                   extra_kwargs=_call_kwargs_for(spec, p.ref_module))
        except Unreplayable as e:
            layers.append(LayerResult(p.ref, p.port, call.type, missing(f"could not replay: {e}"), None, tol,
                                      module=p.ref_module))
            continue
        local64 = ref.fp64.locals.get(p.ref) if ref.fp64 else None
        truth = local64 if isinstance(local64, Local) else None
        factor = spec.noise_floor.factor if spec.noise_floor else None
        forward = compare_named({k: a.data for k, a in port_local.outputs.items()},
                                {k: a.data for k, a in call.outputs.items()}, tol, "output", extra_fails=False,
                                truth=truth and {k: a.data for k, a in truth.outputs.items()}, factor=factor)
        extra = tuple(k for k in port_local.outputs if k not in call.outputs)
        ref_grads = {**ref_local.input_grads, **_qualified(p.ref_module, ref_local.param_grads)}
        port_grads = {**port_local.input_grads,
                      **_as_reference(_qualified(p.port_module, port_local.param_grads), wmap)}
        backward = compare_named(port_grads, ref_grads, tol, "grad", factor=factor, truth=truth and {
            **truth.input_grads, **_qualified(p.ref_module, truth.param_grads)})
        if port_local.ungradded:
            cut = missing(f"no gradient flows from the port's output(s) {', '.join(port_local.ungradded)} "
                          f"(detached or non-differentiable), while the reference's do", "grad")
            backward = combine([cut] if backward is None else [backward, cut])
        layers.append(LayerResult(p.ref, p.port, call.type,
                                  forward or missing("the module returned no tensor"), backward, tol,
                                  port_local.ignored, extra, module=p.ref_module))
    return layers


def _free_running(ref: ReferenceRun, port_trace: Trace, pairing: Pairing, tolerances: Tolerances,
                  spec: ModelSpec) -> list[LayerResult]:
    layers = []
    factor = spec.noise_floor.factor if spec.noise_floor else None
    for p in pairing.pairs:
        call = ref.trace.calls[p.ref]
        call64 = ref.fp64.trace.calls.get(p.ref) if ref.fp64 else None
        tol = tolerances.for_name(p.ref)
        port_call = port_trace.calls.get(p.port)
        if port_call is None:
            layers.append(LayerResult(p.ref, p.port, call.type, missing("the port never called this module"), None, tol,
                                      module=p.ref_module))
            continue
        forward = compare_named({k: a.data for k, a in port_call.outputs.items()},
                                {k: a.data for k, a in call.outputs.items()}, tol, "output", extra_fails=False,
                                truth=call64 and {k: a.data for k, a in call64.outputs.items()}, factor=factor)
        backward = compare_named(port_call.grads, call.grads, tol, "grad of output", extra_fails=False,
                                 truth=call64 and call64.grads, factor=factor)
        extra = tuple(k for k in port_call.outputs if k not in call.outputs)
        amp = amplification(float_inputs(port_call, call.arg_names), float_inputs(call),
                            {k: a.data for k, a in port_call.outputs.items()}, {k: a.data for k, a in call.outputs.items()})
        layers.append(LayerResult(p.ref, p.port, call.type, forward or missing("the module returned no tensor"),
                                  backward, tol, extra_outputs=extra, module=p.ref_module, amplification=amp))
    return layers


def _param_grads(ref: ReferenceRun, port_trace: Trace, wmap: W.WeightMap, tolerances: Tolerances,
                 spec: ModelSpec) -> tuple[TensorResult, ...]:
    ref_trace = ref.trace
    port = _as_reference(port_trace.param_grads, wmap)
    truth = ref.fp64.trace.param_grads if ref.fp64 else {}
    results = []
    for key, g in ref_trace.param_grads.items():
        tol = tolerances.for_name(key)
        m = compare_arrays(port[key], g, tol, key) if key in port else missing("the port parameter got no gradient", key)
        if spec.noise_floor and key in port:
            m = within_noise(m, port[key], g, truth.get(key), tol, spec.noise_floor.factor)
        results.append(TensorResult(key, m, tol))
    for key in port:
        if key not in ref_trace.param_grads:
            results.append(TensorResult(key, missing("the reference parameter got no gradient", key),
                                        tolerances.for_name(key)))
    return tuple(results)

