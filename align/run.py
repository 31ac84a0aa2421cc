"""The orchestrator: spec -> build -> weights -> capture -> pair -> compare -> Report.

Each step is one call into the module that owns it; this file only joins them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from align import weights as W
from align.capture import ROOT, Arr, Call, Trace, flatten, run_and_record
from align.compare import (
    BACKWARD,
    DERIVED,
    FORWARD,
    FREE_RUNNING,
    TEACHER_FORCED,
    Amplification,
    Collector,
    LayerResult,
    RunResult,
    TensorResult,
    Tolerances,
    culprits,
    first_divergence,
    truth_key,
)
from align.diagnose import (Finding, Observer, alongside, bare_run, dtype_table, environment_warnings,
                            judge_observed, observer_check, observer_copy)
from align.force import force
from align.keep import KeptTensor, keeping
from align.metrics import compare_arrays, missing, within_noise
from align.pair import Unpaired, pair_calls
from align.repro import Local, ReproCase
from align.spec import ConfigError, ModelSpec, matches, require_matching

SCHEMA_VERSION = 1
FORCED_TWICE = ("the forced pass ran twice: a port value reaches another module's code by a way no module "
                "boundary shows (an attribute?), so its stretches could not run backward one by one")
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
    kept: tuple[KeptTensor, ...] = ()  # what --keep asked for; written by the CLI, not JSON
    weights_from: str = "rules"  # or "pretrained": the port's own loader, checked against the rules
    only: tuple[str, ...] = ()  # the report limited to these module globs (a partial check)
    path: str = "full"  # or "gate": teacher forcing only, no free-running run and no observer runs
    # False for a streamed --only run that chose no module outside the blocks: the shell was not
    # run, so there are no model outputs and only the chosen blocks' parameter gradients.
    shell_judged: bool = True

    @property
    def verdict(self) -> str:
        ran = [r for r in self.runs if r.status == "ran"]
        if not ran:
            return "error"
        gated = [r for r in ran if r.gated]
        ok = (
            all(r.passed for r in gated)
            and (bool(self.outputs) or not self.shell_judged) and all(o.passed for o in self.outputs)
            and (bool(self.param_grads) or not self.shell_judged) and all(p.passed for p in self.param_grads)
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
            "weights": [e.to_dict() for e in self.weights.entries],
            "unpaired": [u.to_dict() for u in self.unpaired],
            "findings": [f.to_dict() for f in self.findings],
            "observer": [o.to_dict() for o in self.observer],
            "warnings": list(self.warnings),
            "repro": None,
            "kept": None,
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
    trace: Trace  # every call with its inputs, outputs and the gradients at both its boundaries
    weights: dict[str, np.ndarray]  # the reference's state dict
    dtypes: dict[str, str]  # every reference parameter and buffer
    observer: Observer
    env: dict[str, Any]
    checkpoint: str | None
    created: str
    fp64: ReferenceRun | None = None  # the same run in float64, when the model judges fp32 by its noise floor
    only: tuple[str, ...] = ()  # module globs the report is limited to (--only); empty: every module
    truth: dict[str, np.ndarray] = field(default_factory=dict)  # fp64 run only: its forced values (force.Keeper)


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
    return not only or matches(module, only)


def run_reference(spec: ModelSpec, config: str | None = None, checkpoint: Path | None = None,
                  progress: Progress = lambda s: None, only: tuple[str, ...] = (), sink: Any = None,
                  observe: bool = True) -> ReferenceRun:
    """Run only the reference (torch), once, under hooks: every module's inputs, outputs and
    the gradients at both of its boundaries. That is all teacher forcing needs from it: the
    gradient a module sends back to its (boundary-wrapped) inputs, seeded with its recorded
    output gradients, is exactly what replaying it alone would give.

    With `observe`, the model also runs once without hooks (first), to prove they change nothing.
    With a `sink` (a trace_io.TraceWriter), each call is written out and its tensors dropped.
    """
    from align import build
    from align.diagnose import reference_environment
    from align.torch_side import TorchSide

    config = config or spec.default_config
    checkpoint = checkpoint or spec.checkpoint_for(config)
    progress("building the reference")
    ts = TorchSide()
    rules = W.load_rules(spec.weights_file)
    cfg = build.reference_config(spec, config)
    ref = build.build_reference(spec, cfg, checkpoint, ignore=rules.ignored)
    inputs = build.make_inputs(spec, cfg)
    ref_inputs = {k: ts.tensor(a, False) for k, a in inputs.items()}
    progress("running the reference with hooks")
    # The run without hooks goes first: once it is done its activations are freed for the
    # hooked run to reuse, where after it they would be fresh memory (the record holds the
    # hooked run's), whose first touch cost about 3.5 s per GB on the VM this was measured on.
    observed = bare_run(ts, ref, ref_inputs, _seed(ts, spec)) if observe else None
    trace = run_and_record(ts, ref, ref_inputs, _seed(ts, spec), keep_inputs=True)
    observer = (judge_observed(ts.name, observed, trace) if observed is not None
                else Observer("torch", True, True, (), checked=False))
    require_matching(spec, "--only", only, (c.module for c in trace.calls.values()))
    fp64 = _fp64_run(spec, ts, ref, inputs, trace, progress) if spec.noise_floor else None
    if sink is not None:
        for name, call in trace.calls.items():
            sink.add(name, call)
            call.release()
    return ReferenceRun(
        model=spec.name, config_name=config, config=cfg.to_dict(), fingerprint=fingerprint(spec, config),
        inputs=inputs, trace=trace, fp64=fp64, only=tuple(only),
        weights={k: ts.view(v) for k, v in ref.state_dict().items()},  # nothing writes to them: shared
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


def tolerance_policy(spec: ModelSpec) -> str:
    """The fp32 rule in words, with the noise floor when the model declares one."""
    return spec.tolerance.describe() + (f"; {spec.noise_floor.describe()}" if spec.noise_floor else "")


def widened_calls(calls: dict[str, Call]) -> dict[str, Call]:
    """Recorded calls with every fp32 tensor widened to fp64: what a float64 copy of the
    reference is forced on, to give each stretch's exact value on the port's inputs."""
    return {n: dataclasses.replace(c, args=_as_fp64(c.args), kwargs=_as_fp64(c.kwargs), outputs=_as_fp64(c.outputs),
                                   grads={p: g.astype(np.float64) for p, g in c.grads.items()},
                                   input_grads={p: g.astype(np.float64) for p, g in c.input_grads.items()})
            for n, c in calls.items()}


def float64_copy(module: Any) -> Any:
    """A float64 copy of a torch module, without the gradients its parameters hold (which a
    deep copy would copy, and widen)."""
    import copy

    params = list(module.parameters())
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        return copy.deepcopy(module).double()
    finally:
        for p, g in zip(params, grads):
            p.grad = g


def _fp64_run(spec: ModelSpec, ts: Any, ref: Any, inputs: dict[str, Arr], trace: Trace,
              progress: Progress) -> ReferenceRun:
    """The reference again in float64: its whole run (the free-running truth), and one run
    forced on the fp32 run's values, widened (the teacher-forced truth: what each stretch of
    code gives exactly on the inputs the port is fed)."""
    from align.compare import Keeper
    from align.force import force

    progress("running the reference again in float64 (noise floor)")
    ref64 = float64_copy(ref)
    run64 = run_and_record(ts, ref64, {k: ts.tensor(a, False) for k, a in _as_fp64(inputs).items()},
                           _seed(ts, spec), keep_inputs=False)
    widened = widened_calls(trace.calls)
    keeper = Keeper()
    force(ts, ref64, {k: ts.tensor(a, False) for k, a in _as_fp64(inputs).items()}, widened,
          {n: n for n in widened}, keeper, {k: g.astype(np.float64) for k, g in trace.param_grads.items()},
          lambda key, g: {key: g})
    return ReferenceRun(model=spec.name, config_name="fp64", config={}, fingerprint="", inputs={}, trace=run64,
                        weights={}, dtypes={}, observer=Observer("torch", True, True, ()),
                        env={}, checkpoint=None, created="", truth=keeper.kept)


def align_model(spec: ModelSpec, config: str | None = None, dtypes: tuple[str, ...] | None = None,
                checkpoint: Path | None = None, progress: Progress = lambda s: None,
                command: str = "", only: tuple[str, ...] = (), fast: bool = False) -> Report:
    """Align one model in one process: the reference's half, then the port's.

    `config` defaults to the model's default_config, and `checkpoint` to the one align.toml
    names for that config (if any).
    """
    ref = run_reference(spec, config, checkpoint, progress, only, observe=not fast)
    return check_port(spec, ref, dtypes, progress, command, fast=fast, release=True)


def check_port(spec: ModelSpec, ref: ReferenceRun, dtypes: tuple[str, ...] | None = None,
               progress: Progress = lambda s: None, command: str = "", weights_from: str = "rules",
               fast: bool = False, release: bool = False, keep: tuple[str, ...] = ()) -> Report:
    """Run only the port (Paddle) against a ReferenceRun, and judge it. Never imports torch.

    weights_from="rules" loads the port's weights with align's weight rules; "pretrained"
    lets the port's own loader (from_pretrained) convert the reference's checkpoint, and then
    checks every tensor it produced against what the rules say it should be.
    With `release` (the caller has no further use for `ref`), the reference's recorded
    tensors are dropped once the last comparison that needs them is made, so that a port
    observer run made after the others can reuse their memory instead of needing more.
    `keep`: module globs whose comparisons' tensors are kept in full (Report.kept).
    """
    from align import build
    from align.diagnose import environment, port_environment
    from align.paddle_side import PaddleSide

    require_matching(spec, "--keep", keep, (c.module for c in ref.trace.calls.values()))
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
    policy = tolerance_policy(spec)
    runs: list[RunResult] = []
    outputs: tuple[TensorResult, ...] = ()
    param_grads: tuple[TensorResult, ...] = ()
    unpaired: tuple[Unpaired, ...] = ()
    observers: list[Observer] = [ref.observer]
    repro: ReproCase | None = None
    kept: list[KeptTensor] = []
    dtype_list = tuple(dtypes or spec.dtypes)

    def fresh_inputs() -> dict[str, Any]:
        """The model's inputs as the port takes them, in tensors of their own."""
        return {**{k: ps.tensor(a, False) for k, a in _port_inputs(ref.inputs, spec).items()},
                **_call_kwargs_for(spec, ROOT)}

    for dtype in dtype_list:
        if dtype == "bfloat16":
            reason = bf16_unavailable()
            for mode in (TEACHER_FORCED, FREE_RUNNING):
                runs.append(RunResult(dtype, mode, spec.tolerance, spec.bf16.describe(),
                                      status="not_run", reason=reason, gated=mode == TEACHER_FORCED))
            warnings.append(f"bfloat16 was NOT run: {reason}")
            continue

        port_inputs = fresh_inputs()
        port_modules = {ROOT} | {n for n, _ in port.named_sublayers()}
        ref_calls = [(n, c.module) for n, c in ref_trace.calls.items()]
        pairing = pair_calls(ref_calls, port_modules, rules.rename_module)
        names = [p.ref for p in pairing.pairs] + list(ref_trace.param_grads)
        bad_glob = tolerances.unmatched(names)
        if bad_glob is not None:
            raise ConfigError(spec.source, f"models.{spec.name}.tolerance.overrides",
                              f"glob {bad_glob!r} matches no module or parameter")
        to_ref = {p.port: p.ref for p in pairing.pairs}
        factor = noise.factor if noise else None

        tf = Collector(tolerances, ref.fp64.truth if noise else None, factor)
        tf_judge, tf_keeper = keeping(tf, keep, dtype, TEACHER_FORCED)
        forcing = partial(force, ps, port, port_inputs, ref_trace.calls, to_ref, tf_judge, ref_trace.param_grads,
                          lambda key, g: _as_reference({key: g}, wmap))

        # The full path's run without hooks goes alongside the forced pass, on a copy of the
        # port, when there is a core and the memory for it (see observer_copy).
        copied = None if fast else observer_copy(ps, port, ref_trace.output_bytes())
        observed = None
        if copied is None:
            progress(f"{dtype}: teacher-forcing all {len(pairing.pairs)} modules in one pass")
            forced = forcing()
        else:
            progress(f"{dtype}: teacher-forcing all {len(pairing.pairs)} modules in one pass, "
                     "the port's run without hooks alongside")
            observed, forced = alongside(partial(bare_run, ps, copied, fresh_inputs(), _seed(ps, spec)), forcing)
            copied = None
        kept += tf_keeper.kept if tf_keeper else []
        if not forced.eager:
            warnings.append(FORCED_TWICE)
        pairing = pair_calls(ref_calls, port_modules, rules.rename_module, [(n, n.split("#")[0]) for n in forced.owner])
        unpaired = tuple(u if not (why := rules.unpaired_reason(u.name.split("#")[0]))
                         else Unpaired(u.name, u.side, f"{why} ({rules.source.name})", allowed=True)
                         for u in pairing.unpaired)
        reported = [p for p in pairing.pairs if selected(p.ref_module, ref.only)]
        tf_layers = tuple(_forced_layers(reported, ref_trace.calls, forced, tf, tolerances))
        fwd_order = ref_trace.completion_order()
        bwd_order = ref_trace.start_order()[::-1]
        tf_culprits = culprits(tf_layers, fwd_order, bwd_order)
        runs.append(RunResult(dtype, TEACHER_FORCED, spec.tolerance, policy, tf_layers,
                              first_divergence(tf_layers, fwd_order, bwd_order), tf_culprits, gated=True))
        first = (tf_culprits.forward or tf_culprits.backward or (None,))[0]
        if first is not None and repro is None:
            pair = next(p for p in pairing.pairs if p.ref == first)
            prefix = "" if pair.ref_module == ROOT else pair.ref_module + "."
            module_weights = {k[len(prefix):]: v for k, v in ref.weights.items() if k.startswith(prefix)}
            repro = ReproCase.make(spec, ref.config, pair, ref_trace.calls[first], _reference_local(ref, pair),
                                   module_weights, ps, port, tolerances.for_name(first), wmap)
        if fast:
            # The gate path: what the forced pass saw of the model's outputs and parameters.
            outputs = tuple(TensorResult(k, m, tolerances.for_name(k)) for k, m in tf.labelled(ROOT, FORWARD, "output "))
            param_grads = tuple(TensorResult(k, m, tolerances.for_name(k))
                                for owner in forced.first_calls.values()
                                for k, m in tf.labelled(owner, BACKWARD, "grad of parameter "))
            missing_grads = set(ref_trace.param_grads) - {r.name for r in param_grads}
            param_grads += tuple(TensorResult(k, missing("the port parameter got no gradient", k), tolerances.for_name(k))
                                 for k in sorted(missing_grads))
            observers = [ref.observer, Observer("paddle", True, True, (), checked=False)]
        else:
            last = release and dtype == dtype_list[-1]  # the record is not needed after this dtype's runs
            if last:
                for call in ref_trace.calls.values():
                    call.input_grads = {}  # only forcing judges them: memory for the free-running run
            progress(f"{dtype}: running the port free, comparing as it goes")
            fr = Collector(tolerances, _fp64_free_truth(ref.fp64) if noise else None, factor)
            fr_judge, fr_keeper = keeping(fr, keep, dtype, FREE_RUNNING)
            follower, port_param_grads = _follow(ps, port, port_inputs, ref_trace.calls, to_ref, fr_judge,
                                                 _seed(ps, spec))
            kept += fr_keeper.kept if fr_keeper else []
            fr_layers = tuple(_free_layers(reported, ref_trace, follower, fr, tolerances))
            runs.append(RunResult(dtype, FREE_RUNNING, spec.tolerance, policy, fr_layers,
                                  first_divergence(fr_layers, fwd_order, bwd_order),
                                  culprits(fr_layers, fwd_order, bwd_order), gated=False))
            outputs, param_grads = _model_outputs(spec, ref, follower.root_outputs, tolerances, noise), \
                _param_grads(ref, port_param_grads, wmap, tolerances, spec)
            if last:
                for call in ref_trace.calls.values():
                    call.release()
                ref_trace.param_grads, ref.weights = {}, {}
            progress(f"{dtype}: checking that hooks change nothing")
            hooked_run = Trace("paddle", {}, port_param_grads, {}, follower.root_outputs)
            observers = [ref.observer,
                         observer_check(ps, port, port_inputs, _seed(ps, spec), hooked_run) if observed is None
                         else judge_observed(ps.name, observed, hooked_run, alongside=True)]
            for o in observers:
                if o.perturbed:
                    msg = (f"observer effect: the {o.framework} model's outputs or gradients differ with hooks "
                           f"installed ({', '.join(o.differing[:5])})")
                    warnings.append(msg)
                    findings.append(Finding("observer_effect", o.framework, msg, fails=False))

    return Report(
        model=spec.name, config=ref.config_name, port=spec.port_class, weights_from=weights_from,
        runs=tuple(runs), outputs=outputs,
        param_grads=param_grads, weights=wmap, unpaired=unpaired, env=env,
        command=command or f"align run {spec.name}",
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        only=ref.only, path="gate" if fast else "full", checkpoint=ref.checkpoint, findings=tuple(findings),
        observer=tuple(observers), dtypes=dtypes_seen, warnings=tuple(warnings), repro=repro, kept=tuple(kept),
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


def _notes(notes: Any) -> tuple[str, ...]:
    return tuple(notes.ignored) + tuple(f"{k}: kept the port's own" for k in notes.kept)


def _forced_layers(pairs: list, ref_calls: dict, forced: Any, tf: Collector,
                   tolerances: Tolerances) -> list[LayerResult]:
    layers = []
    for p in pairs:
        call = ref_calls[p.ref]
        tol = tolerances.for_name(p.ref)
        notes = forced.notes.get(p.ref)
        if notes is None:
            layers.append(LayerResult(p.ref, p.port, call.type, missing("the port never called this module"), None, tol,
                                      module=p.ref_module))
            continue
        layers.append(LayerResult(p.ref, p.port, call.type,
                                  tf.get(p.ref, FORWARD) or missing("the module returned no tensor"),
                                  tf.get(p.ref, BACKWARD), tol, _notes(notes), tuple(notes.extra), module=p.ref_module))
    return layers


def _follow(ps: Any, port: Any, port_inputs: dict[str, Any], ref_calls: dict, to_ref: dict[str, str],
            judge: Any, seed: Callable) -> tuple[Any, dict[str, np.ndarray]]:
    """The free-running run of the port, compared by `judge` as it goes; returns what the
    Follower kept and the port's parameter gradients."""
    from align.capture import hooked
    from align.force import Follower

    follower = Follower(ps, ref_calls, to_ref, judge)
    ps.clear_grads(port)
    with hooked(ps, port, follower):
        output = port(**port_inputs)
        ps.backward(seed(output))
    follower.finish()
    grads = {k: g for k, prm in ps.parameters(port).items() if (g := ps.grad(prm)) is not None}
    ps.clear_grads(port)
    return follower, grads


def _free_layers(pairs: list, ref_trace: Trace, follower: Any, fr: Collector,
                 tolerances: Tolerances) -> list[LayerResult]:
    layers = []
    for p in pairs:
        call = ref_trace.calls[p.ref]
        tol = tolerances.for_name(p.ref)
        if p.ref not in follower.called:
            layers.append(LayerResult(p.ref, p.port, call.type, missing("the port never called this module"), None, tol,
                                      module=p.ref_module))
            continue
        amp = Amplification.of(follower.input_error.get(p.ref, 0.0), follower.output_error.get(p.ref, 0.0))
        layers.append(LayerResult(p.ref, p.port, call.type, fr.get(p.ref, FORWARD) or missing("the module returned no tensor"),
                                  fr.get(p.ref, BACKWARD), tol, extra_outputs=tuple(follower.extra.get(p.ref, ())),
                                  module=p.ref_module, amplification=amp))
    return layers


def _fp64_free_truth(fp64: ReferenceRun) -> dict[str, np.ndarray]:
    """The float64 run's values under the labels the Follower uses."""
    truth = {}
    for name, call in fp64.trace.calls.items():
        truth.update({truth_key(name, f"output {p}"): a.data for p, a in call.outputs.items()})
        truth.update({truth_key(name, f"grad of output {p}"): g for p, g in call.grads.items()})
    return truth


def _model_outputs(spec: ModelSpec, ref: ReferenceRun, port_outputs: dict[str, Arr], tolerances: Tolerances,
                   noise: Any) -> tuple[TensorResult, ...]:
    """The model's own outputs, end to end (free-running), plus the derived ones."""

    def judged(name: str, port_arr: np.ndarray, ref_arr: np.ndarray, truth: np.ndarray | None) -> TensorResult:
        tol = tolerances.for_name(name)
        m = compare_arrays(port_arr, ref_arr, tol, name)
        return TensorResult(name, within_noise(m, port_arr, ref_arr, truth, tol, noise.factor) if noise else m, tol)

    truth_out = {k: a.data for k, a in ref.fp64.trace.outputs.items()} if noise else {}
    outputs = tuple(
        judged(k, port_outputs[k].data, a.data, truth_out.get(k)) if k in port_outputs
        else TensorResult(k, missing(f"the port returned no {k!r}", k), tolerances.for_name(k))
        for k, a in ref.trace.outputs.items()
    )
    input_arrays = {k: a.data for k, a in ref.inputs.items()}
    for name in spec.inputs.derived:
        fn = DERIVED[name]
        ref_out = fn({k: a.data for k, a in ref.trace.outputs.items()}, input_arrays)
        port_out = fn({k: a.data for k, a in port_outputs.items()}, input_arrays)
        outputs += (judged(f"{name} (derived)", port_out, ref_out, fn(truth_out, input_arrays) if noise else None),)
    return outputs


def _reference_local(ref: ReferenceRun, pair: Any) -> Local:
    """What the reference module computes alone on its recorded inputs, read off its run: its
    outputs, the gradients it sent back to its inputs, and its own parameters' gradients
    (for a module called more than once, or whose parameters are shared, their total)."""
    call = ref.trace.calls[pair.ref]
    prefix = "" if pair.ref_module == ROOT else pair.ref_module + "."
    own = {k[len(prefix):]: g for k, g in ref.trace.param_grads.items()
           if k.startswith(prefix) and "." not in k[len(prefix):]}
    return Local(outputs=dict(call.outputs), input_grads=dict(call.input_grads), param_grads=own)


def _param_grads(ref: ReferenceRun, port_grads: dict[str, np.ndarray], wmap: W.WeightMap, tolerances: Tolerances,
                 spec: ModelSpec) -> tuple[TensorResult, ...]:
    ref_trace = ref.trace
    port = _as_reference(port_grads, wmap)
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
