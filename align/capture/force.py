"""Judge every module on its own, in one forward and one backward of the port.

Teacher forcing at every boundary: each module call of the port receives the reference's
recorded inputs, and whatever it returns is replaced, for the rest of the network, by the
reference's recorded outputs. Every stretch of computation between two module boundaries
therefore runs on reference values only, and its error is its own:

- a module's outputs (before they are replaced) measure the code that produced them: its
  own forward, after its children (whose outputs it received from the reference);
- a child's inputs (before they are replaced) measure the code of the module that called
  it, so a wrong RoPE inside an attention is the attention's, not its o_proj's.

Backward is forced the same way. Every replaced value is a fresh leaf, so the stretches are
separate graphs; each is seeded with the reference's gradient at its far boundary. The
gradient that arrives at a leaf then measures the stretch that consumed it, seeded exactly
as the reference was; it is judged as it arrives. Since the reference's gradients are all
known beforehand, a stretch's backward runs as soon as its call returns: the forward and
backward of the port are interleaved, call by call, and its activations never pile up.

The comparisons happen as the tensors appear, through a `Judge`; nothing of the port is
kept. The same pass on the reference in float64 (with a judge that keeps what it is shown)
gives the noise floor's exact values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from align.capture.hooks import ModelRaised, hooked
from align.capture.structure import (
    Feed,
    as_feed,
    flatten,
    map_inputs,
    map_tensors,
    module_path,
    named_inputs,
)
from align.capture.trace import BACKWARD, FORWARD, PARAMETER_GRAD, ROOT, Arr, Call, Framework, differentiable
from align.errors import ConfigError

ToReference = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class Rejoined(Exception):
    """Two stretches turned out to be one graph after the first one's backward had run."""


class Judge(Protocol):
    """Receives each comparison as it happens. `owner` is the reference call the code under
    test belongs to; `label` names the tensor within it. `port` may share memory the model
    writes to later: a judge that keeps it must copy it."""

    def compare(self, owner: str, direction: str, label: str, port: np.ndarray, ref: np.ndarray) -> None: ...
    def fail(self, owner: str, direction: str, label: str, note: str) -> None: ...
    def clear(self) -> None: ...


@dataclass
class Notes:
    """What a call's comparison leaves aside, for the report."""

    ignored: list[str] = field(default_factory=list)  # reference inputs the port's call has no counterpart for
    kept: list[str] = field(default_factory=list)  # inputs left as the port made them (another layout)
    # of those, the ones that are another tensor, not another layout: other sizes, not the
    # reference's dimensions in another order (text where the reference passes audio)
    foreign: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # outputs the port returns beyond the reference's


def _compatible(fw: Framework, t: Any, a: Arr) -> bool:
    """Whether the reference's tensor can stand in for the port's: both floating or both not,
    and the reference's shape equal to the port's or broadcasting to it (a (1, T) position
    table where the port built (B, T)), as a replay on the reference's inputs would pass it."""
    if fw.is_float(t) != differentiable(a.dtype):
        return False
    port, ref = tuple(t.shape), tuple(a.data.shape)
    return port == ref or (len(port) == len(ref) and all(r in (1, p) for p, r in zip(port, ref)))


def _seen_as(t_shape: tuple, ref: np.ndarray) -> np.ndarray:
    """The reference's tensor in the port's shape, to judge the port's value against."""
    return ref if tuple(ref.shape) == tuple(t_shape) else np.broadcast_to(ref, tuple(t_shape))


def _arg_names(call: Call, ref_call: Call, n: int) -> tuple[str, ...]:
    """Positional inputs named as the reference's forward names them (so `x` and `input` at
    position 0 are one input), else by the port's own names where the reference's caller
    passed those by keyword, else by the reference's parameter at that position where its
    caller passed that one by keyword (a timm-style attention's `x` is transformers'
    `self_attn(hidden_states=...)`), else by the port's own names."""
    own, by_keyword = call.arg_names, ref_call.kwargs.keys()

    def name(i: int) -> str:
        if i < len(ref_call.arg_names):
            return ref_call.arg_names[i]
        mine = own[i] if i < len(own) else f"args[{i}]"
        if mine not in by_keyword and i < len(ref_call.params) and ref_call.params[i] in by_keyword:
            return ref_call.params[i]
        return mine

    return tuple(name(i) for i in range(n))


def _as_reference_paths(flat: list[tuple[str, Any]], ref_outputs: dict[str, Arr]) -> list[tuple[str, Any]]:
    """A bare tensor where the reference returns a tuple (its first element the output, then
    extras such as attention weights), or the other way round, is that first element: a port's
    `x` is the reference's `(x, weights)[0]`, and a port's `(x, extra)` answers a bare `x`.
    One tensor answers one tensor, whatever each side calls it (timm's classifier returns bare
    logits where a transformers-style port returns them as `logits`)."""
    if not flat or flat[0][0] in ref_outputs:
        return flat
    if len(flat) == 1 and len(ref_outputs) == 1:
        return [(next(iter(ref_outputs)), flat[0][1])]
    first = {"out": "0", "0": "out"}.get(flat[0][0])
    if first is None or first not in ref_outputs or (first == "0" and len(flat) > 1):
        return flat
    return [(first, flat[0][1]), *flat[1:]]


def _produced(fw: Framework, judge: Judge, ref_name: str, ref_call: Call, output: Any,
              is_model: bool) -> tuple[list[tuple[str, Any]], list[str]]:
    """A call's output tensors by path, and the paths the reference has not (extras, not
    compared). A reference output the port does not return fails when something depended on
    it: it is the model's own, or a gradient came back to it. Attention weights nobody asked
    the port for are not a mismatch."""
    flat = _as_reference_paths([(p, t) for p, t in flatten(output, fw) if fw.is_tensor(t)], ref_call.outputs)
    produced = {p for p, _ in flat}
    for path in ref_call.outputs:
        if path not in produced and (is_model or path in ref_call.grads):
            judge.fail(ref_name, FORWARD, f"output {path}", f"the port produced no output {path!r}")
    return flat, [p for p, _ in flat if p not in ref_call.outputs]


class Forcer:
    """The sink (see capture.hooked) that forces a model on a reference trace.

    `to_ref` maps the model's call names to reference call names (the pairing); calls with no
    partner run untouched and their code counts as their caller's.
    """

    def __init__(self, fw: Framework, ref_calls: dict[str, Call], to_ref: dict[str, str], judge: Judge,
                 prefix: str = "", eager: bool = True):
        self.fw, self.ref_calls, self.to_ref, self.judge = fw, ref_calls, to_ref, judge
        self.prefix = prefix  # the model being forced is this submodule of the whole (see capture.hooked)
        self.eager = eager  # run each stretch's backward as soon as its call returns (see exit)
        self.owner: dict[str, str | None] = {}  # model call name -> the reference call its code counts for
        self.notes: dict[str, Notes] = {}
        self.stretches: dict[str | None, list[tuple[Any, np.ndarray]]] = {}  # owner -> its seeds
        self.joined: set[str] = set()  # stretches a port value crosses into or out of: run with the caller's
        # The leaves that stand for reference values, by id (kept alive, so their ids stay theirs).
        self.leaves: dict[int, Any] = {}
        self.pending: dict[int, tuple[str, str, np.ndarray]] = {}  # leaf -> owner, label, reference gradient
        self.arrived: list[int] = []  # leaves whose gradient was judged: dropped when the next one arrives
        self.fired: set[int] = set()  # leaves whose gradient has arrived
        self.first_calls: dict[str, str] = {}  # module path -> its first call's reference name

    def _leaf(self, a: Arr, grad: np.ndarray | None, owner: str | None, label: str) -> Any:
        """The reference's value, handed on in place of the port's. With a gradient, the
        gradient that comes back to it is judged (as `owner`'s, unless None) as it arrives,
        and dropped soon after: kept to the end, they would double the backward's memory.
        Both frameworks refuse in-place writes to such a leaf, so it may share the record."""
        if grad is None or not differentiable(a.dtype):
            return self.fw.tensor(a, requires_grad=False)
        leaf = self.fw.tensor(a, requires_grad=True)
        key = id(leaf)
        self.leaves[key] = leaf
        if owner is not None:
            self.pending[key] = (owner, label, grad)
        self.fw.on_grad(leaf, lambda g: self._arrived(key, g))
        return leaf

    def _arrived(self, key: int, g: Any) -> None:
        # Our hook runs first of a leaf's hooks (it was registered when the leaf was made), so
        # `g` is the gradient before any the port registered on the tensor it was handed: the
        # leaf is judged by what is stored in its .grad once every hook has run, when the
        # next leaf's gradient arrives or the backward ends.
        if key in self.fired:  # a second backward reached it: stretches joined by a way no boundary shows
            raise Rejoined("a gradient reached one leaf in two backward passes")
        self.fired.add(key)
        self._drop_arrived()
        self.arrived.append(key)

    def _drop_arrived(self) -> None:
        """Judge, then free, the stored gradients of the leaves that have arrived (a leaf whose
        gradient is not stored yet waits)."""
        waiting = []
        for key in self.arrived:
            leaf = self.leaves[key]
            g = self.fw.grad(leaf)
            if g is None:
                waiting.append(key)
                continue
            hit = self.pending.pop(key, None)
            if hit is not None:
                owner, label, ref_grad = hit
                self.judge.compare(owner, BACKWARD, label, g, ref_grad)
            self.fw.drop_grad(leaf)
        self.arrived = waiting

    def enter(self, call: Call, module: Any, args: tuple, kwargs: dict, caller: Call | None) -> tuple | None:
        ref_name = self.to_ref.get(call.name)
        parent = self.owner.get(caller.name) if caller else None
        self.owner[call.name] = ref_name or parent
        if ref_name is None:
            return None
        self.notes[ref_name] = notes = Notes()
        self.first_calls.setdefault(call.module, ref_name)
        if caller is None:
            return None  # the model's own inputs are what the caller passed (shifted labels, ...)
        fw, ref_call = self.fw, self.ref_calls[ref_name]
        ref_inputs = dict(named_inputs(ref_call.args, ref_call.kwargs, ref_call.arg_names))
        names = _arg_names(call, ref_call, len(args))
        seen: set[str] = set()

        def swap(path: str, t: Any) -> Any:
            a = ref_inputs.get(path)
            if a is None:
                return self._kept(ref_name, t)
            seen.add(path)
            if not _compatible(fw, t, a):
                notes.kept.append(f"{path} ({fw.dtype_name(t)}{list(t.shape)} vs reference {a.dtype}{list(a.data.shape)})")
                if sorted(t.shape) != sorted(a.data.shape):
                    notes.foreign.append(path)
                return self._kept(ref_name, t)
            label = f"{ref_name} input {path}"  # the reference's names: the noise floor's truth is kept by them
            if parent is not None:
                self.judge.compare(parent, FORWARD, label, fw.view(t), _seen_as(tuple(t.shape), a.data))
            grad = ref_call.input_grads.get(path)
            if grad is not None and parent is not None and tuple(t.shape) == grad.shape:
                if fw.needs_grad(t):
                    self.stretches.setdefault(parent, []).append((t, grad))
                else:
                    self.judge.fail(parent, BACKWARD, label,
                                    f"no gradient reaches {label} (detached?), while the reference's does")
            return self._leaf(a, grad, ref_name, f"grad of input {path}")

        new_args, new_kwargs = map_inputs(args, kwargs, names, fw, swap)
        notes.ignored.extend(p for p, a in ref_inputs.items() if p not in seen)
        return new_args, new_kwargs

    def exit(self, call: Call, module: Any, args: tuple, output: Any, caller: Call | None) -> Any:
        ref_name = self.to_ref.get(call.name)
        if ref_name is None:
            return output
        fw, ref_call = self.fw, self.ref_calls[ref_name]
        parent = self.owner.get(caller.name) if caller else None
        flat, extra = _produced(fw, self.judge, ref_name, ref_call, output, caller is None)
        self.notes[ref_name].extra.extend(extra)
        paths = iter(p for p, _ in flat)

        def swap(t: Any) -> Any:
            path = next(paths)
            a = ref_call.outputs.get(path)
            if a is None:
                return t
            port_shape, ref_shape = tuple(t.shape), tuple(a.data.shape)
            if fw.dtype_name(t) != a.dtype:
                self.judge.fail(ref_name, FORWARD, f"output {path}",
                                f"dtype mismatch: port {fw.dtype_name(t)}{list(port_shape)} vs reference "
                                f"{a.dtype}{list(ref_shape)}")
            else:
                self.judge.compare(ref_name, FORWARD, f"output {path}", fw.view(t), a.data)
            grad = ref_call.grads.get(path)
            if grad is not None:
                if port_shape != ref_shape:
                    self.judge.fail(ref_name, BACKWARD, f"grad of output {path}",
                                    f"shape mismatch: port {port_shape} vs reference {ref_shape}: the reference's "
                                    "gradient cannot seed the port's output")
                elif fw.needs_grad(t):
                    self.stretches.setdefault(ref_name, []).append((t, grad))
                else:
                    self.judge.fail(ref_name, BACKWARD, f"grad of output {path}",
                                    f"no gradient flows from the port's output {path} (detached or "
                                    f"non-differentiable), while the reference's does")
            if caller is None or fw.is_float(t) != differentiable(a.dtype):
                return t  # the model's own outputs go back to the caller as they are
            # The reference's value goes on, whatever the port made (of another shape even): the
            # rest of the network is judged on reference values, so a wrong output is its own.
            return self._leaf(a, grad, parent, f"grad of {ref_name} output {path}")

        output = map_tensors(output, fw, swap)
        if caller is not None:
            self._close(ref_name, parent, output)
        return output

    def _caller_of(self, path: str) -> str | None:
        """The call a module's parameters count for: its own first call, or, for a module
        never called (a parent reading `embedding.weight` directly), its nearest called
        ancestor's, whose code used them."""
        top = self.prefix or ROOT  # the model being forced: nothing above it is
        while path not in self.first_calls:
            if path == top:
                return None
            path = path.rsplit(".", 1)[0] if "." in path else ROOT
        return self.first_calls[path]

    def _kept(self, ref_name: str, t: Any) -> Any:
        """An input handed on as the port made it: if gradients flow through it, this call's
        stretch is joined to the one that made it."""
        if self.fw.needs_grad(t) and id(t) not in self.leaves:
            self.joined.add(ref_name)
        return t

    def _close(self, ref_name: str, parent: str | None, output: Any) -> None:
        """The call has returned, so its stretch (its own code, between the cuts) is whole:
        its backward can run now, freeing its activations before the next call makes
        more. Unless a port value crosses its boundary uncut (an input or output with no
        reference counterpart): then it is one graph with its caller's, and runs with it."""
        fw = self.fw
        seeds = self.stretches.pop(ref_name, [])
        crossed = ref_name in self.joined or any(
            fw.needs_grad(t) and id(t) not in self.leaves for _, t in flatten(output, fw) if fw.is_tensor(t))
        if crossed or not self.eager:
            self.stretches.setdefault(parent, []).extend(seeds)
        else:
            self._run(seeds)

    def _run(self, seeds: list[tuple[Any, np.ndarray]]) -> None:
        merged: dict[int, tuple[Any, np.ndarray]] = {}
        for t, g in seeds:  # one tensor handed to several modules: their seeds add up
            merged[id(t)] = (t, merged[id(t)][1] + g) if id(t) in merged else (t, g)
        if merged:
            self.fw.backward_from([t for t, _ in merged.values()], [g for _, g in merged.values()])

    def backward(self, model: Any, ref_param_grads: dict[str, np.ndarray], to_reference: ToReference) -> None:
        """Run the backward of what is left (the model's own stretch, and any joined to it),
        then judge what is left to judge: leaves nothing reached, and every module's own
        parameters (against the reference's, seeded identically)."""
        fw = self.fw
        self._run([seed for seeds in self.stretches.values() for seed in seeds])
        self.stretches = {}
        self._drop_arrived()
        for owner, label, ref_grad in self.pending.values():
            # nothing flowed back: equal to the reference only if it sent zeros
            self.judge.compare(owner, BACKWARD, label, np.zeros_like(ref_grad), ref_grad)
        by_call: dict[str, dict[str, np.ndarray]] = {}
        for inner, module in fw.modules(model):
            path = module_path(self.prefix, inner)
            ref_name = self._caller_of(path)
            if ref_name is None:
                continue
            prefix = "" if path == ROOT else path + "."
            for attr, p in fw.direct_parameters(module).items():
                if (g := fw.grad(p)) is not None:
                    by_call.setdefault(ref_name, {})[prefix + attr] = g
        # per call, all at once: the parts of a split tensor come back joined
        for ref_name, grads in by_call.items():
            for key, rg in to_reference(grads).items():
                if key in ref_param_grads:
                    self.judge.compare(ref_name, BACKWARD, PARAMETER_GRAD + key, rg, ref_param_grads[key])
        self.pending, self.leaves = {}, {}  # the hooks hold this Forcer: let go of the leaves


def eager_or_once(judge: Judge, attempt: Callable[[bool], Forcer]) -> Forcer:
    """`attempt(eager=True)`: a forced pass whose stretches run backward as their calls
    return. Should that fail (a port value reaching another module's code by a way no
    boundary shows, an attribute say, whose graph was then already freed), the judge
    forgets what it saw and the pass is made again with one backward at the end."""
    try:
        return attempt(True)
    except Exception:  # noqa: BLE001 - Paddle rethrows Rejoined as its own error; a real one recurs below
        judge.clear()
        return attempt(False)


def force_call(fw: Framework, model: Any, run: Callable[[], Any], ref_calls: dict[str, Call], to_ref: dict[str, str],
               judge: Judge, ref_param_grads: dict[str, np.ndarray], to_reference: ToReference,
               prefix: str = "") -> Forcer:
    """The forced pass of `model` (the submodule `prefix` of the whole, if given) over
    `run()`, which calls it, making its inputs afresh each time; eager if it can be (see
    eager_or_once). The judge has seen every comparison."""

    def attempt(eager: bool) -> Forcer:
        forcer = Forcer(fw, ref_calls, to_ref, judge, prefix=prefix, eager=eager)
        fw.clear_grads(model)
        try:
            with hooked(fw, model, forcer, prefix=prefix):
                run()
            forcer.backward(model, ref_param_grads, to_reference)
        except ConfigError:
            raise
        except Exception as e:
            # The port's own code raised: say where (outside any module call, as in the
            # final backward, it is the model's), with what the pass judged until then.
            raised = e if isinstance(e, ModelRaised) else ModelRaised(prefix or ROOT, e)
            raised.forcer = forcer
            raise raised from e.__cause__ if isinstance(e, ModelRaised) else e
        finally:
            forcer.leaves = {}  # their hooks hold the Forcer: a cycle through the framework
        return forcer

    return eager_or_once(judge, attempt)


def force(fw: Framework, model: Any, inputs: Any, ref_calls: dict[str, Call], to_ref: dict[str, str],
          judge: Judge, ref_param_grads: dict[str, np.ndarray], to_reference: ToReference, owner: str = ROOT,
          prefix: str = "") -> Forcer:
    """One forced forward and backward of `model` (the submodule `prefix` of the whole, if
    given; see force_call) on `inputs`: a Feed, a dict of keyword arguments, or a function
    making a Feed afresh for each attempt. The gradients that reach the Feed's leaves are
    judged as `owner`'s (the reference call of `model` itself) "grad of input PATH"."""
    made: list[Feed] = []

    def run() -> None:
        made[:] = [as_feed(inputs() if callable(inputs) else inputs)]  # this attempt's
        made[0](model)

    forcer = force_call(fw, model, run, ref_calls, to_ref, judge, ref_param_grads, to_reference, prefix=prefix)
    ref_grads = ref_calls[owner].input_grads
    for path, leaf in made[0].leaves.items():
        g, ref_g = fw.grad(leaf), ref_grads.get(path)
        if ref_g is None:
            if g is not None and np.any(g):
                judge.fail(owner, BACKWARD, f"grad of input {path}",
                           "a gradient reaches the port's input, while none reaches the reference's")
            continue
        judge.compare(owner, BACKWARD, f"grad of input {path}", np.zeros_like(ref_g) if g is None else g, ref_g)
    fw.clear_grads(model)
    return forcer


