"""The reference's half of an alignment: run it once under hooks and keep the record that
teacher forcing needs (ReferenceRun), plus, with a noise floor, the same run in float64."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from align import weights as W
from align.builders.backward import backward_seed
from align.capture.force import force_call
from align.capture.hooks import run_and_record
from align.capture.trace import Arr, Call, Trace
from align.compare.judges import Keeper, truth_key
from align.core.judged import Progress
from align.diagnose.observer import Observer, bare_run, judge_observed
from align.registry.spec import ModelSpec, require_matching


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

    from align.builders.models import config_values

    values, _, _ = config_values(spec, config)
    blob = json.dumps({"model": spec.name, "config": values, "rules": spec.weights_file.read_text(),
                       "inputs": repr(spec.inputs), "init": repr(spec.init)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
    from align import builders
    from align.capture.torch_side import TorchSide
    from align.diagnose.environment import reference_environment

    config = config or spec.default_config
    checkpoint = checkpoint or spec.checkpoint_for(config)
    progress("building the reference")
    ts = TorchSide()
    rules = W.load_rules(spec.weights_file)
    cfg = builders.reference_config(spec, config)
    ref = builders.build_reference(spec, cfg, checkpoint, ignore=rules.ignored)
    inputs = builders.make_inputs(spec, cfg)
    ref_inputs = {k: ts.tensor(a, False) for k, a in inputs.items()}
    progress("running the reference with hooks")
    # The run without hooks goes first: once it is done its activations are freed for the
    # hooked run to reuse, where after it they would be fresh memory (the record holds the
    # hooked run's), whose first touch cost about 3.5 s per GB on the VM this was measured on.
    observed = bare_run(ts, ref, ref_inputs, backward_seed(ts, spec)) if observe else None
    trace = run_and_record(ts, ref, ref_inputs, backward_seed(ts, spec), keep_inputs=True)
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


def as_fp64(obj: Any) -> Any:
    """A recorded structure with its fp32 tensors widened to fp64 (others unchanged)."""
    if isinstance(obj, Arr):
        return Arr(obj.data.astype(np.float64), "float64", obj.requires_grad) if obj.dtype == "float32" else obj
    if isinstance(obj, dict):
        return {k: as_fp64(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        items = [as_fp64(v) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    return obj


def widened_calls(calls: dict[str, Call]) -> dict[str, Call]:
    """Recorded calls with every fp32 tensor widened to fp64: what a float64 copy of the
    reference is forced on, to give each stretch's exact value on the port's inputs."""
    return {n: dataclasses.replace(c, args=as_fp64(c.args), kwargs=as_fp64(c.kwargs), outputs=as_fp64(c.outputs),
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


def forced_truth(ts: Any, module: Any, calls: dict[str, Call], params: Any, run: Any, prefix: str = "") -> dict:
    """The noise floor's teacher-forced truth for one part of the reference: `module` (a
    float64 copy) forced on its record `calls` widened, `run(widened)` calling it: what each
    stretch of code gives exactly on the inputs the port is fed, kept by a Keeper under the
    labels the port's forced pass uses. The Keeper reads no reference value, so naming the
    parameters (`params`) whose gradients to keep is enough."""
    keeper, widened = Keeper(), widened_calls(calls)
    force_call(ts, module, lambda: run(widened), widened, {n: n for n in widened}, keeper, dict.fromkeys(params),
               lambda key, g: {key: g}, prefix=prefix)
    ts.clear_grads(module)
    return keeper.kept


def _fp64_run(spec: ModelSpec, ts: Any, ref: Any, inputs: dict[str, Arr], trace: Trace,
              progress: Progress) -> ReferenceRun:
    """The reference again in float64: its whole run (the free-running truth), and one run
    forced on the fp32 run's values, widened (the teacher-forced truth, see forced_truth)."""
    progress("running the reference again in float64 (noise floor)")
    ref64 = float64_copy(ref)
    run64 = run_and_record(ts, ref64, {k: ts.tensor(a, False) for k, a in as_fp64(inputs).items()},
                           backward_seed(ts, spec), keep_inputs=False)
    truth = forced_truth(ts, ref64, trace.calls, trace.param_grads,
                         lambda widened: ref64(**{k: ts.tensor(a, False) for k, a in as_fp64(inputs).items()}))
    return ReferenceRun(model=spec.name, config_name="fp64", config={}, fingerprint="", inputs={}, trace=run64,
                        weights={}, dtypes={}, observer=Observer("torch", True, True, ()),
                        env={}, checkpoint=None, created="", truth=truth)


def free_truth(fp64: ReferenceRun) -> dict[str, np.ndarray]:
    """The float64 run's values under the labels the Follower uses."""
    truth = {}
    for name, call in fp64.trace.calls.items():
        truth.update({truth_key(name, f"output {p}"): a.data for p, a in call.outputs.items()})
        truth.update({truth_key(name, f"grad of output {p}"): g for p, g in call.grads.items()})
    return truth
