"""The reference's half of an alignment: run it once under hooks and keep the record that
teacher forcing needs (ReferenceRun), plus, with a noise floor, the same run in float64."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from align import weights as W
from align.builders.backward import backward_seed
from align.builders.inputs import feed
from align.capture.force import force
from align.capture.hooks import ModelRaised, run_and_record
from align.capture.trace import ROOT, Arr, Call, Trace
from align.compare.judges import Keeper, truth_key
from align.compare.pair import pair_calls
from align.core.judged import Progress
from align.diagnose.observer import Observer, bare_run, judge_observed
from align.errors import ConfigError, one_line
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
    fp64: ReferenceRun | None = None  # the same run in float64 (the truth), once made
    only: tuple[str, ...] = ()  # module globs the report is limited to (--only); empty: every module
    truth: dict[str, np.ndarray] = field(default_factory=dict)  # fp64 run only: its forced values (force.Keeper)
    # The reference calls the port's forced pass forces (those paired with a port module), which
    # the forced truth forces alone; None: every call. On the fp64 run: those it was made for.
    forced: frozenset[str] | None = None
    # In the process that ran the reference: makes the float64 run when a comparison first needs
    # it (not written to a trace, which holds the float64 run itself).
    later: Callable[[frozenset[str] | None], ReferenceRun] | None = field(default=None, repr=False, compare=False)

    def float64(self) -> ReferenceRun:
        """The float64 run, made now if it was left for later."""
        if self.fp64 is None and self.later is not None:
            self.fp64, self.later = self.later(self.forced), None
        if self.fp64 is None:
            raise RuntimeError("no float64 run of the reference: the trace was written without one")
        return self.fp64


def fingerprint(spec: ModelSpec, config: str) -> str:
    """What a trace must match: the model, the config's values and the weight rules."""
    import hashlib
    import json

    from align.builders.models import config_values

    values, _, _ = config_values(spec, config)
    blob = json.dumps({"model": spec.name, "config": values, "rules": spec.weights_file.read_text() if spec.weights_file else "",
                       "inputs": repr(spec.inputs), "init": repr(spec.init)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_reference(spec: ModelSpec, config: str | None = None, checkpoint: Path | None = None,
                  progress: Progress = lambda s: None, only: tuple[str, ...] = (), sink: Any = None,
                  observe: bool = True, port_modules: Collection[str] | None = None) -> ReferenceRun:
    """Run only the reference (torch), once, under hooks: every module's inputs, outputs and
    the gradients at both of its boundaries. That is all teacher forcing needs from it: the
    gradient a module sends back to its (boundary-wrapped) inputs, seeded with its recorded
    output gradients, is exactly what replaying it alone would give.

    With `observe`, the model also runs once without hooks (first), to prove they change nothing.
    With a `sink` (a trace_io.TraceWriter), each call is written out and its tensors dropped,
    and the float64 truth is made now, forcing the calls that pair with `port_modules` (the
    port's module paths; every call if not given, see forced_truth).
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
    inputs = builders.make_inputs(spec, builders.values_of(cfg))
    progress("running the reference with hooks")
    # The run without hooks goes first: once it is done its activations are freed for the
    # hooked run to reuse, where after it they would be fresh memory (the record holds the
    # hooked run's), whose first touch cost about 3.5 s per GB on the VM this was measured on.
    with reference_raises(spec):
        try:
            observed = bare_run(ts, ref, feed(ts, spec, inputs), backward_seed(ts, spec)) if observe else None
        except ConfigError:
            raise
        except Exception:  # noqa: BLE001 - run it again under hooks, which say in which module it raises
            observed = None
        trace = run_and_record(ts, ref, feed(ts, spec, inputs), backward_seed(ts, spec), keep_inputs=True)
    observer = (judge_observed(ts.name, observed, trace) if observed is not None
                else Observer("torch", True, True, (), checked=False))
    require_matching(spec, "--only", only, (c.module for c in trace.calls.values()))
    # The float64 truth is made only if a comparison needs it, but a trace (another process
    # may judge the port) holds it, made now, before its calls are written out and dropped.
    make_fp64 = partial(_fp64_run, spec, ts, ref, inputs, trace, progress) if spec.noise_floor else None
    forced = None if port_modules is None else paired_calls(trace.calls, port_modules, rules)
    fp64 = make_fp64(forced) if make_fp64 and sink is not None else None
    if sink is not None:
        for name, call in trace.calls.items():
            sink.add(name, call)
            call.release()
    return ReferenceRun(
        model=spec.name, config_name=config, config=builders.values_of(cfg), fingerprint=fingerprint(spec, config),
        inputs=inputs, trace=trace, fp64=fp64, only=tuple(only), later=None if fp64 else make_fp64, forced=forced,
        weights={k: ts.view(v) for k, v in ref.state_dict().items()},  # nothing writes to them: shared
        dtypes={k: ts.dtype_name(t) for k, t in {**ts.parameters(ref), **ts.buffers(ref)}.items()},
        observer=observer, env=reference_environment(),
        checkpoint=None if checkpoint is None else str(checkpoint),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


@contextmanager
def reference_raises(spec: ModelSpec) -> Iterator[None]:
    """The reference's code (or the recipe feeding it) raising is the user's to fix: one line
    naming the model, the module it raised in and the exception."""
    try:
        yield
    except ModelRaised as e:
        raise ConfigError(spec.source, f"models.{spec.name}.reference",
                          f"the reference raised in module {e.module} on the recipe's inputs (models.{spec.name}."
                          f"inputs): {type(e.error).__name__}: {one_line(e.error)}") from None


def as_fp64(obj: Any) -> Any:
    """A recorded structure with its fp32 tensors widened to fp64 (others unchanged)."""
    if isinstance(obj, Arr):
        if obj.dtype in ("float32", "complex64"):
            wide = "float64" if obj.dtype == "float32" else "complex128"
            return Arr(obj.data.astype(wide), wide, obj.requires_grad)
        return obj
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
                                   grads={p: _widened(g) for p, g in c.grads.items()},
                                   input_grads={p: _widened(g) for p, g in c.input_grads.items()})
            for n, c in calls.items()}


def _widened(g: np.ndarray) -> np.ndarray:
    return g.astype(np.complex128 if np.iscomplexobj(g) else np.float64)


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


def paired_calls(calls: dict[str, Call], port_modules: Collection[str], rules: W.Rules) -> frozenset[str] | None:
    """The reference calls a port with these module paths pairs with, those its forced pass
    forces; None if that is every call."""
    pairing = pair_calls([(n, c.module) for n, c in calls.items()], set(port_modules), rules.rename_module)
    paired = frozenset(p.ref for p in pairing.pairs)
    return None if paired == frozenset(calls) else paired


def forced_truth(ts: Any, module: Any, calls: dict[str, Call], params: Any, make: Callable[[dict[str, Call]], Any],
                 owner: str = ROOT, prefix: str = "", forced: Collection[str] | None = None) -> dict:
    """The noise floor's teacher-forced truth for one part of the reference: `module` (a
    float64 copy) forced on its record `calls` widened, on the inputs `make(widened)` makes
    (a Feed): what each stretch of code gives exactly on the inputs the port is fed, kept by a
    Keeper under the labels the port's forced pass uses. The Keeper reads no reference value,
    so naming the parameters (`params`) whose gradients to keep is enough.

    `forced`: the calls the port's pass forces; only those are forced here, so that each
    stretch measured is the stretch the port's comparison covers. A port that fuses q, k and v
    into one Linear has no counterpart of the reference's q_proj: its attention's output, and
    its fused weight's gradient, are computed across the three projections, and so is their
    truth. None: every call (a port that pairs with all of them)."""
    keeper, widened = Keeper(), widened_calls(calls)
    to_ref = {n: n for n in widened if forced is None or n in forced}
    force(ts, module, lambda: make(widened), widened, to_ref, keeper, dict.fromkeys(params),
          dict, owner=owner, prefix=prefix)
    return keeper.kept


@contextmanager
def float64_through_casts(spec: ModelSpec) -> Iterator[None]:
    """While a float64 copy of the reference runs, and only for a model whose registry entry
    says `float64 = "through-casts"`: a cast of a float64 tensor to float32 (`x.float()`,
    `x.to(torch.float32)`, `x.type(torch.float32)`) leaves it in float64. A reference that
    casts on purpose (whisper's LayerNorm runs in float32 whatever the model's dtype) then runs
    in float64 all the way, as its truth must; a torch function mode, removed on exit."""
    if spec.noise_floor is None or not spec.noise_floor.through_casts:
        with _float64_raises(spec):
            yield
        return
    import torch
    from torch.overrides import TorchFunctionMode

    def to_float32(func: Any, args: tuple, kwargs: dict) -> bool:
        if func is torch.Tensor.float:
            return True
        if func in (torch.Tensor.to, torch.Tensor.type):
            dtype = kwargs.get("dtype", next((a for a in args[1:] if isinstance(a, torch.dtype)), None))
            return dtype is torch.float32
        return False

    class KeepFloat64(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if args and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.float64 \
                    and to_float32(func, args, kwargs):
                return args[0]
            return func(*args, **kwargs)

    with KeepFloat64(), _float64_raises(spec):
        yield


@contextmanager
def _float64_raises(spec: ModelSpec) -> Iterator[None]:
    """The reference raising in float64 (and not in fp32) is its registry entry's to say: one
    line naming the module, the exception, and the two ways the entry can say it."""
    try:
        yield
    except ModelRaised as e:
        raise ConfigError(spec.source, f"models.{spec.name}.tolerance.float64",
                          f"a float64 copy of the reference raised in module {e.module}: {type(e.error).__name__}: "
                          f"{one_line(e.error)}; a reference that casts to float32 on purpose runs with float64 = "
                          f"\"through-casts\", one without a float64 path with float64 = false") from None


def _fp64_run(spec: ModelSpec, ts: Any, ref: Any, inputs: dict[str, Arr], trace: Trace,
              progress: Progress, forced: frozenset[str] | None = None) -> ReferenceRun:
    """The reference again in float64: its whole run (the free-running truth), and one run
    forced on the fp32 run's values, widened (the teacher-forced truth, see forced_truth)."""
    progress("running the reference again in float64 (noise floor)")
    ref64 = float64_copy(ref)
    wide = as_fp64(inputs)
    arg_names = trace.calls[ROOT].arg_names
    with float64_through_casts(spec):
        run64 = run_and_record(ts, ref64, feed(ts, spec, wide), backward_seed(ts, spec), keep_inputs=False)
        truth = forced_truth(ts, ref64, trace.calls, trace.param_grads,
                             lambda widened: feed(ts, spec, wide, None, arg_names), forced=forced)
    return ReferenceRun(model=spec.name, config_name="fp64", config={}, fingerprint="", inputs={}, trace=run64,
                        weights={}, dtypes={}, observer=Observer("torch", True, True, ()),
                        env={}, checkpoint=None, created="", truth=truth, forced=forced)


def free_truth(fp64: ReferenceRun) -> dict[str, np.ndarray]:
    """The float64 run's values under the labels the Follower uses."""
    truth = {}
    for name, call in fp64.trace.calls.items():
        truth.update({truth_key(name, f"output {p}"): a.data for p, a in call.outputs.items()})
        truth.update({truth_key(name, f"grad of output {p}"): g for p, g in call.grads.items()})
    truth.update({truth_key(ROOT, f"grad of input {p}"): g for p, g in fp64.trace.calls[ROOT].input_grads.items()})
    return truth
