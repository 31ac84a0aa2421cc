"""The port's half of an alignment, in memory: build the port, give it the reference's weights,
force it on the reference's record (judged module by module), then, on the full path, run it
free (how error accumulates) and without hooks (the observer effect). Never imports torch:
the record may come from another process (align check).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from align import builders
from align import weights as W
from align.builders.backward import backward_seed
from align.builders.inputs import call_kwargs, feed, inputs_for_port, reference_names
from align.capture.follow import Follower
from align.capture.force import force
from align.capture.hooks import ModelRaised, hooked
from align.capture.structure import Feed
from align.capture.trace import BACKWARD, FORWARD, ROOT, Arr, Trace
from align.compare.judges import Collector
from align.compare.metrics import Metrics, compare_arrays, missing, rel_l2, within_noise
from align.compare.pair import Pair, pair_calls
from align.compare.results import (
    FREE_RUNNING,
    TEACHER_FORCED,
    Amplification,
    LayerResult,
    RunResult,
    TensorResult,
    Tolerances,
)
from align.core.judged import Judgement, Progress, as_reference, now, selected, tolerance_policy
from align.core.reference import ReferenceRun, free_truth, paired_calls, run_reference
from align.diagnose.culprits import culprits, first_divergence, uncalled
from align.diagnose.environment import bf16_unavailable, environment, environment_warnings, port_environment
from align.diagnose.findings import Finding, dtype_table
from align.diagnose.observer import Observer, alongside, bare_run, judge_observed, observer_check, observer_copy
from align.diagnose.repro import ReproCase
from align.errors import ConfigError
from align.registry.spec import ModelSpec, require_matching
from align.report.schema import Report
from align.weights.loader import load_weights, plan_for


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
    from align.capture.paddle_side import PaddleSide

    require_matching(spec, "--keep", keep, (c.module for c in ref.trace.calls.values()))
    if spec.noise_floor and ref.fp64 is None and ref.later is None:
        raise ConfigError(spec.source, f"models.{spec.name}.tolerance",
                          "the trace has no float64 run of the reference, which judges fp32; trace it again")
    ps = PaddleSide()
    rules = W.load_rules(spec.weights_file)
    port, wmap, findings = _port_with_weights(spec, ref, rules, ps, weights_from, progress)
    dtypes_seen, mismatched = dtype_table(ref.dtypes, {k: ps.dtype_name(t) for k, t in
                                                       {**ps.parameters(port), **ps.buffers(port)}.items()},
                                          partial(_port_key, wmap, rules))
    findings = mismatched + findings
    env = environment(ref.env, port_environment(), {"init": spec.init.seed, "inputs": spec.inputs.seed})
    warnings = environment_warnings(env) + _truth_forces(ref, paired_calls(ref.trace.calls, port_modules(port), rules))
    runs: list[RunResult] = []
    outputs: tuple[TensorResult, ...] = ()
    param_grads: tuple[TensorResult, ...] = ()
    input_grads: tuple[TensorResult, ...] = ()
    unpaired: tuple = ()
    observers: list[Observer] = [ref.observer]
    repro: ReproCase | None = None
    kept: list = []
    dtype_list = tuple(dtypes or spec.dtypes)
    for dtype in dtype_list:
        if dtype == "bfloat16":
            reason = bf16_unavailable()
            runs += [RunResult(dtype, mode, spec.tolerance, spec.bf16.describe(), status="not_run", reason=reason,
                               gated=mode == TEACHER_FORCED) for mode in (TEACHER_FORCED, FREE_RUNNING)]
            warnings.append(f"bfloat16 was NOT run: {reason}")
            continue
        names = {path: name for name, path in reference_names(spec, ref.trace.calls[ROOT].arg_names).items()}
        judgement = Judgement(spec, rules, dtype, ref.only, keep, names)
        observed, pairs, to_ref = _forced(spec, ref, ps, port, wmap, rules, judgement, progress, observe=not fast)
        runs.append(judgement.run(tolerance_policy(spec), ref.trace.completion_order(),
                                  ref.trace.start_order()[::-1]))
        unpaired = tuple(judgement.unpaired)
        warnings += judgement.warnings
        if repro is None and (first := (runs[-1].culprits.forward or runs[-1].culprits.backward or (None,))[0]):
            pair = next(p for p in pairs if p.ref == first)
            repro = ReproCase.of(spec, ref.config, pair, ref.trace, ref.weights, ps, port,
                                 judgement.tolerances.for_name(first), wmap)
        last = release and dtype == dtype_list[-1]  # the record is not needed after this dtype's runs
        free = None
        if not (fast or judgement.raised):
            if last:
                for name, call in ref.trace.calls.items():
                    if name != ROOT:  # the model's own input gradients are judged free-running too
                        call.input_grads = {}  # only forcing judges them: memory for the free-running run
            progress(f"{dtype}: running the port free, comparing as it goes")
            try:
                free, follower, port_grads, input_grads = _free_running(spec, ref, ps, port, judgement, pairs, to_ref)
            except ModelRaised as e:
                judgement.raised = e
        if free is None:
            # The gate path, or a port that raised (it cannot run free either): what the forced
            # pass saw of the model's outputs, parameters and inputs.
            judgement.missing_grads(ref.trace.param_grads)
            outputs, param_grads = tuple(judgement.outputs), tuple(judgement.param_grads)
            input_grads = tuple(judgement.input_grads)
            observers = [ref.observer, Observer("paddle", True, True, (), checked=False)]
            kept += judgement.kept
            if judgement.raised and not fast:
                runs.append(RunResult(dtype, FREE_RUNNING, spec.tolerance, tolerance_policy(spec), status="not_run",
                                      reason=f"the port raised in {judgement.raised.module}", gated=False))
            continue
        runs.append(free)
        outputs, param_grads = _model_outputs(spec, ref, follower.model_outputs, judgement.tolerances), \
            _param_grads(spec, ref, port_grads, wmap, judgement.tolerances)
        kept += judgement.kept
        if last:
            for call in ref.trace.calls.values():
                call.release()
            ref.trace.param_grads, ref.weights = {}, {}
        progress(f"{dtype}: checking that hooks change nothing")
        hooked_run = Trace("paddle", {}, port_grads, {}, follower.root_outputs)
        observers = [ref.observer, judge_observed(ps.name, observed, hooked_run, alongside=True) if observed
                     else observer_check(ps, port, _fresh_inputs(spec, ref, ps), backward_seed(ps, spec), hooked_run)]
        for o in observers:
            if o.perturbed:
                msg = (f"observer effect: the {o.framework} model's outputs or gradients differ with hooks "
                       f"installed ({', '.join(o.differing[:5])})")
                warnings.append(msg)
                findings.append(Finding("observer_effect", o.framework, msg, fails=False))

    return Report(
        model=spec.name, config=ref.config_name, port=spec.port_class, weights_from=weights_from,
        runs=tuple(runs), outputs=outputs, param_grads=param_grads, input_grads=input_grads, weights=wmap,
        unpaired=unpaired, env=env,
        command=command or f"align run {spec.name}", created=now(), only=ref.only, path="gate" if fast else "full",
        checkpoint=ref.checkpoint, findings=tuple(findings), observer=tuple(observers), dtypes=dtypes_seen,
        warnings=tuple(warnings), repro=repro, kept=tuple(kept),
        judging=spec.judging,
    )


def _port_with_weights(spec: ModelSpec, ref: ReferenceRun, rules: W.Rules, ps: Any, weights_from: str,
                       progress: Progress) -> tuple[Any, W.WeightMap, list[Finding]]:
    """The port with the reference's weights, by align's rules or by its own loader (whose
    every tensor is then checked against what the rules say it should be)."""
    if weights_from != "pretrained":
        progress("building the port")
        port = builders.build_port_from(spec, ref.config)
        progress("mapping weights")
        return port, load_weights(rules, ref.weights, port, ps, ref.config), []
    progress("loading the port with its own from_pretrained")
    port = builders.load_port_pretrained(spec, ref.config, ref.weights)
    port_state = port.state_dict()
    wmap = W.verify(plan_for(rules, ref.weights, port, ref.config), ref.weights,
                    lambda k: ps.record(port_state[k]).data, strict=False)
    return port, wmap, [Finding("loader_mismatch", e.source, f"{e.source} -> {e.target}: the port's own loader gives a "
                                f"different tensor than the rules ({e.rule})", fails=True)
                        for e in wmap.entries if e.exact is False]


def _port_key(wmap: W.WeightMap, rules: W.Rules, key: str) -> str | None:
    """The port tensor a reference tensor becomes (None for one fused with others)."""
    for e in wmap.entries:
        if key in e.sources:
            return e.targets[0] if len(e.targets) == 1 and e.transform != "merge" else None
    return rules.rename(key)[0]


def port_modules(port: Any) -> set[str]:
    return {ROOT} | {n for n, _ in port.named_sublayers()}


def _truth_forces(ref: ReferenceRun, forced: frozenset[str] | None) -> list[str]:
    """The float64 truth, not made yet, is to force the calls the port's pass forces; one made
    already for other calls (a trace made without the port's module paths) is said."""
    if ref.fp64 is None:
        ref.forced = forced
        return []
    if not ref.trace.calls or ref.fp64.forced == forced:
        return []
    made = "every reference call" if ref.fp64.forced is None else f"{len(ref.fp64.forced)} reference calls"
    return [f"the float64 truth was made forcing {made}, not the {len(forced or ref.trace.calls)} this port's pass "
            f"forces: where one stretch of the port covers several reference calls (a fused qkv) it is tighter "
            f"than the port's own rounding (a possible false alarm, never a false pass); trace with "
            f"--port-modules (`align port-modules`), as `align run` does"]


def _fresh_inputs(spec: ModelSpec, ref: ReferenceRun, ps: Any) -> Feed:
    """The model's inputs as the port takes them, in tensors of their own."""
    return feed(ps, spec, inputs_for_port(ref.inputs, spec), call_kwargs(spec, ROOT), ref.trace.calls[ROOT].arg_names)


def _forced(spec: ModelSpec, ref: ReferenceRun, ps: Any, port: Any, wmap: W.WeightMap, rules: W.Rules,
            judgement: Judgement, progress: Progress, observe: bool) -> tuple[Any, list[Pair], dict[str, str]]:
    """The whole port forced on the reference's record in one pass, recorded in `judgement`;
    with `observe`, its run without hooks alongside, on a copy (see observer_copy), when
    there is a core and the memory for it. Returns what that run observed (or None), the
    pairs and the port-to-reference call names."""
    calls = ref.trace.calls
    modules = port_modules(port)
    ref_calls = [(n, c.module) for n, c in calls.items()]
    pairing = pair_calls(ref_calls, modules, rules.rename_module)
    bad_glob = judgement.tolerances.unmatched([p.ref for p in pairing.pairs] + list(ref.trace.param_grads))
    if bad_glob is not None:
        raise ConfigError(spec.source, f"models.{spec.name}.tolerance.overrides",
                          f"glob {bad_glob!r} matches no module or parameter")
    to_ref = {p.port: p.ref for p in pairing.pairs}
    collector, judge = judgement.judge(ref.fp64.truth if ref.fp64 else None)
    forcing = partial(force, ps, port, lambda: _fresh_inputs(spec, ref, ps), calls, to_ref, judge,
                      ref.trace.param_grads, partial(as_reference, wmap=wmap))
    copied = observer_copy(ps, port, ref.trace.output_bytes()) if observe else None
    observed, raised = None, None
    what = f"{judgement.dtype}: teacher-forcing all {len(pairing.pairs)} modules in one pass"
    try:
        if copied is None:
            progress(what)
            forcer = forcing()
        else:
            progress(what + ", the port's run without hooks alongside")
            observed, forcer = alongside(partial(_observed, ps, copied, _fresh_inputs(spec, ref, ps),
                                                 backward_seed(ps, spec)), forcing)
    except ModelRaised as e:  # a failure of the port's, named where it happened
        raised, forcer, observed = e, e.forcer, None
    if collector.deferred:
        progress(f"{judgement.dtype}: {len(collector.deferred)} comparisons fail the literal tolerance: the reference "
                 "again in float64, as the truth")
        collector.settle(ref.float64().truth)
    # Paired again with the calls the port made, to name those no reference call maps to.
    pairing = pair_calls(ref_calls, modules, rules.rename_module, [(n, n.split("#")[0]) for n in forcer.owner])
    judgement.record(collector, forcer, list(pairing.pairs), calls, pairing.unpaired, model=True, raised=raised)
    return observed, list(pairing.pairs), to_ref


def _observed(ps: Any, model: Any, inputs: Feed, seed: Any) -> Any:
    """The port's run without hooks, or None if it raises: a port that raises is judged by the
    forced and free-running passes, which say where."""
    try:
        return bare_run(ps, model, inputs, seed)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - see above
        return None


def _free_running(spec: ModelSpec, ref: ReferenceRun, ps: Any, port: Any, judgement: Judgement, pairs: list[Pair],
                  to_ref: dict[str, str]) -> tuple[RunResult, Follower, dict[str, np.ndarray], tuple[TensorResult, ...]]:
    """The port run on its own values, compared module by module as it goes (informational):
    its RunResult, the Follower (which kept the model's outputs), its parameter gradients,
    and the gradients it sent back to its inputs, judged (input:NAME)."""
    truth = free_truth(ref.fp64) if ref.fp64 else None
    collector, judge = judgement.judge(truth, FREE_RUNNING)
    follower = Follower(ps, ref.trace.calls, to_ref, judge, rel_l2)
    ps.clear_grads(port)
    fed = _fresh_inputs(spec, ref, ps)
    with hooked(ps, port, follower):
        ps.backward(backward_seed(ps, spec)(fed(port)))
    follower.finish()
    grads = {k: g for k, prm in ps.parameters(port).items() if (g := ps.grad(prm)) is not None}
    inputs = Collector(judgement.tolerances, truth, judgement.factor, judgement.strict)
    ref_grads = ref.trace.calls[ROOT].input_grads
    for path, leaf in fed.leaves.items():
        g, ref_g = ps.grad(leaf), ref_grads.get(path)
        if ref_g is not None:
            inputs.compare(ROOT, BACKWARD, f"grad of input {path}", np.zeros_like(ref_g) if g is None else g, ref_g)
    for part in (collector, inputs):
        if part.deferred:
            part.settle(free_truth(ref.float64()))
    input_grads = tuple(TensorResult(judgement.input_name(path), m, judgement.tolerances.for_name(judgement.input_name(path)))
                        for path, m in inputs.labelled(ROOT, BACKWARD, "grad of input "))
    ps.clear_grads(port)
    layers = uncalled(tuple(_free_layers([p for p in pairs if selected(p.ref_module, ref.only)], ref.trace, follower,
                                         collector, judgement.tolerances)))
    fwd, bwd = ref.trace.completion_order(), ref.trace.start_order()[::-1]
    run = RunResult(judgement.dtype, FREE_RUNNING, spec.tolerance, tolerance_policy(spec), layers,
                    first_divergence(layers, fwd, bwd), culprits(layers, fwd, bwd), gated=False)
    return run, follower, grads, input_grads


def _free_layers(pairs: list[Pair], ref_trace: Trace, follower: Follower, fr: Collector,
                 tolerances: Tolerances) -> list[LayerResult]:
    layers = []
    for p in pairs:
        call = ref_trace.calls[p.ref]
        tol = tolerances.for_name(p.ref)
        if p.ref not in follower.called:
            layers.append(LayerResult(p.ref, p.port, call.type, missing("the port never called this module"), None, tol,
                                      module=p.ref_module, called=False))
            continue
        amp = Amplification.of(follower.input_error.get(p.ref, 0.0), follower.output_error.get(p.ref, 0.0))
        layers.append(LayerResult(p.ref, p.port, call.type, fr.get(p.ref, FORWARD) or missing("the module returned no tensor"),
                                  fr.get(p.ref, BACKWARD), tol, extra_outputs=tuple(follower.extra.get(p.ref, ())),
                                  module=p.ref_module, amplification=amp))
    return layers


def _floored(spec: ModelSpec, ref: ReferenceRun, name: str, port: np.ndarray, ref_arr: np.ndarray,
             tol: Any, truth: Callable[[ReferenceRun], np.ndarray | None]) -> Metrics:
    """One model-level tensor judged: the literal rule, then, if that fails, the float64 truth
    (`truth(fp64 run)`), made only then."""
    m = compare_arrays(port, ref_arr, tol, name)
    if m.passed or m.note or spec.noise_floor is None:
        return m
    floor = spec.noise_floor
    return within_noise(m, port, ref_arr, truth(ref.float64()), tol, floor.factor, floor.strict)


def _model_outputs(spec: ModelSpec, ref: ReferenceRun, port_outputs: dict[str, Arr],
                   tolerances: Tolerances) -> tuple[TensorResult, ...]:
    """The model's own outputs, end to end (free-running), plus the derived ones."""
    outputs = tuple(
        TensorResult(k, _floored(spec, ref, k, port_outputs[k].data, a.data, tolerances.for_name(k),
                                 lambda fp64, k=k: fp64.trace.outputs[k].data if k in fp64.trace.outputs else None),
                     tolerances.for_name(k)) if k in port_outputs
        else TensorResult(k, missing(f"the port returned no {k!r}", k), tolerances.for_name(k))
        for k, a in ref.trace.outputs.items()
    )
    input_arrays = {k: a.data for k, a in ref.inputs.items()}
    for target in spec.inputs.derived:
        fn = builders.import_object(target, spec.source, f"models.{spec.name}.inputs.derived")
        name = f"{target.partition(':')[2]} (derived)"
        ref_out = fn({k: a.data for k, a in ref.trace.outputs.items()}, input_arrays)
        port_out = fn({k: a.data for k, a in port_outputs.items()}, input_arrays)
        tol = tolerances.for_name(name)
        outputs += (TensorResult(name, _floored(spec, ref, name, port_out, ref_out, tol, lambda fp64, fn=fn: fn(
            {k: a.data for k, a in fp64.trace.outputs.items()}, input_arrays)), tol),)
    return outputs


def _param_grads(spec: ModelSpec, ref: ReferenceRun, port_grads: dict[str, np.ndarray], wmap: W.WeightMap,
                 tolerances: Tolerances) -> tuple[TensorResult, ...]:
    """Every parameter gradient of the free-running run, against the reference's."""
    ref_grads = ref.trace.param_grads
    port = as_reference(port_grads, wmap)
    results = []
    for key, g in ref_grads.items():
        tol = tolerances.for_name(key)
        m = (_floored(spec, ref, key, port[key], g, tol, lambda fp64, key=key: fp64.trace.param_grads.get(key))
             if key in port else missing("the port parameter got no gradient", key))
        results.append(TensorResult(key, m, tol))
    results += [TensorResult(key, missing("the reference parameter got no gradient", key), tolerances.for_name(key))
                for key in port if key not in ref_grads]
    return tuple(results)
