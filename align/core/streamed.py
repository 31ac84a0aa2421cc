"""Layer-streamed alignment: a decoder stack larger than memory, one block at a time.

Both models are built as skeletons (torch on the meta device, Paddle under LazyGuard): no
weight is allocated. Weights come from a memory-mapped safetensors checkpoint, one unit at
a time, and are freed after use. Memory is then about one block per framework, plus the
shell (embeddings, final norm, head) of one framework at a time, plus the activations at
the block boundaries. The reference shell's large gradients wait on disk in between (Spill).

1. The reference runs whole with its shell loaded; each block is loaded for its call, run
   without gradients, recorded, freed, and its output cut into a fresh leaf. The loss's
   backward reaches the last block's output leaf.
2. Blocks last to first: the reference block is loaded and run again on its recorded inputs,
   under hooks, seeded with the gradient its output leaf received. That sends the gradient
   on to the previous block's output leaf (from the first block, into the embeddings). The
   port's block is loaded and forced on that record (capture.force): every module inside is
   judged on its own, forward and backward. Both blocks are freed.
3. The port's shell is loaded and forced on the reference's record, each block call
   answered from the record instead of run: this judges the code around the blocks
   (embedding scale, masks, norm, head, loss) and the shell's parameter gradients.

What a block's (or the shell's) forced pass fails by the literal rule is judged against the
float64 truth: the reference block loaded again, a float64 copy of it forced on its record
widened (as reference.py does for the whole model). It is made only for a part that needs it,
so a run that passes literally costs what it did before.

Blocks must feed each other directly (block k's output is block k+1's input, as in
transformers' decoder stacks); a model with code between them is refused, not misjudged.
"""

from __future__ import annotations

import fnmatch
import functools
import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from align import builders
from align import weights as W
from align.atomic import scratch
from align.builders.backward import backward_seed
from align.builders.inputs import call_kwargs, feed, inputs_for_port
from align.capture.force import Forcer, Judge, ToReference, force
from align.capture.hooks import Recorder, hooked
from align.capture.structure import Feed, flatten, map_inputs, map_tensors, snapshot
from align.capture.trace import ROOT, Arr, Call, differentiable
from align.compare.judges import Keeper
from align.compare.pair import pair_calls
from align.core.judged import Judgement, Progress, as_reference, now, selected, tolerance_policy
from align.core.reference import as_fp64, float64_copy, float64_through_casts, forced_truth, widened_calls
from align.core.spill import Spill
from align.diagnose.environment import environment, port_environment, reference_environment
from align.diagnose.observer import Observer
from align.errors import ConfigError
from align.registry.spec import ModelSpec, require_matching
from align.report.schema import Report
from align.weights.loader import Loader, within


@dataclass
class _Block:
    """One block call as the reference's first pass saw it."""

    name: str  # "model.layers.3"
    args: tuple  # the live inputs (the previous block's output leaf among them)
    kwargs: dict
    record: Call
    leaves: list = field(default_factory=list)  # (path, leaf): its output, cut


class _ShellRecorder(Recorder):
    """The reference's first pass: the shell recorded as usual; each block loaded, run without
    gradients, recorded, freed, and its output cut into leaves that gather its gradient."""

    def __init__(self, fw: Any, blocks: str, loader: Loader):
        super().__init__(fw, keep_inputs=True)
        self.blocks, self.loader = blocks, loader
        self.seen: list[_Block] = []
        self._modes: list[bool] = []

    def is_block(self, module: str) -> bool:
        return fnmatch.fnmatchcase(module, f"{self.blocks}.*") and "." not in module[len(self.blocks) + 1:]

    def inside(self, module: str) -> bool:
        return module.startswith(self.blocks + ".") and not self.is_block(module)

    def enter(self, call: Call, module: Any, args: tuple, kwargs: dict, caller: Call | None) -> tuple | None:
        if self.inside(call.module):
            return None
        if not self.is_block(call.module):
            return super().enter(call, module, args, kwargs, caller)
        torch = self.loader.torch
        self.loader.load_ref(call.module)
        record = Call(call.name, call.module, call.type, call.start, arg_names=call.arg_names, params=call.params)
        record.args, record.kwargs = snapshot(args, self.fw), snapshot(kwargs, self.fw)
        self.seen.append(_Block(call.name, args, kwargs, record))
        self._modes.append(torch.is_grad_enabled())
        torch.set_grad_enabled(False)
        return None

    def exit(self, call: Call, module: Any, args: tuple, output: Any, caller: Call | None) -> Any:
        if self.inside(call.module):
            return output
        if not self.is_block(call.module):
            return super().exit(call, module, args, output, caller)
        self.loader.torch.set_grad_enabled(self._modes.pop())
        self.loader.free_ref(call.module)
        block = self.seen[-1]
        block.record.end = call.end
        flat = [(p, t) for p, t in flatten(output, self.fw) if self.fw.is_tensor(t)]
        block.record.outputs = {p: self.fw.record(t) for p, t in flat}
        paths = iter(p for p, _ in flat)

        def cut(t: Any) -> Any:
            leaf = t.detach().requires_grad_(t.is_floating_point())
            block.leaves.append((next(paths), leaf))
            return leaf

        return map_tensors(output, self.fw, cut)


@contextmanager
def _answered(fw: Any, port: Any, records: dict[str, Call], widen: bool = False) -> Iterator[None]:
    """The port's blocks answer their calls from the reference's record instead of running
    (each block's own code is judged on its own), in float64 with `widen`. Instance
    attributes, removed on exit."""
    patched = []
    for path, record in records.items():
        block = fw.submodule(port, path)

        @functools.wraps(block.forward)  # keeps the signature: its inputs are named as the real one's
        def answer(*args: Any, record: Call = record, **kwargs: Any) -> Any:
            outs = {p: fw.tensor(a, requires_grad=differentiable(a.dtype))
                    for p, a in (as_fp64(record.outputs) if widen else record.outputs).items()}
            return outs["out"] if list(outs) == ["out"] else tuple(outs[str(i)] for i in range(len(outs)))

        block.forward = answer
        patched.append(block)
    try:
        yield
    finally:
        for block in patched:
            del block.forward


def _block_inputs(ps: Any, module: Any, call: Call, extra: dict) -> Feed:
    """A recorded call's inputs as the port block takes them; those the reference sent a
    gradient back to as leaves, whose gradients are then judged as the block's."""
    accepted = ps.accepted_kwargs(module)
    leaves = {}

    def make(path: str, a: Arr) -> Any:
        t = ps.tensor(a, requires_grad=path in call.input_grads)
        if path in call.input_grads:
            leaves[path] = t
        return t

    kwargs = {k: v for k, v in call.kwargs.items() if accepted is None or k in accepted}
    args, kwargs = map_inputs(call.args, kwargs, call.arg_names, None, make)
    kwargs.update({k: v for k, v in extra.items() if accepted is None or k in accepted})
    return Feed(args, kwargs, leaves)


def _force_block(ps: Any, block: Any, port_name: str, ref_name: str, calls: dict[str, Call], to_ref: dict[str, str],
                 judge: Judge, ref_param_grads: dict[str, np.ndarray], to_reference: ToReference,
                 extra: dict) -> Forcer:
    """One port block forced on its reference record, inputs and all: the gradients that
    come back to its inputs are judged as its own."""
    return force(ps, block, lambda: _block_inputs(ps, block, calls[ref_name], extra), calls, to_ref, judge,
                 ref_param_grads, to_reference, owner=ref_name, prefix=port_name)


def _block_truth(spec: ModelSpec, ts: Any, block: Any, name: str, calls: dict[str, Call],
                 grads: dict[str, np.ndarray], forced: set[str]) -> dict:
    """The noise floor's truth for one block: a float64 copy of the reference block, forced
    on its own record widened at the calls the port's pass forces (`forced`), as
    reference.forced_truth does for the whole model (a Keeper keeps what it gives, under the
    labels the port's forced pass uses)."""
    keeper, widened = Keeper(), widened_calls(calls)
    with float64_through_casts(spec):
        _force_block(ts, float64_copy(block), name, name, widened, {n: n for n in widened if n in forced}, keeper,
                     grads, dict, {})
    return keeper.kept


def _shell_truth(ts: Any, spec: ModelSpec, ref: Any, calls: dict[str, Call], block_records: set[str],
                 inputs: dict[str, Arr], params: set[str], forced: set[str]) -> dict:
    """The noise floor's truth for the shell: a float64 copy of the reference (its blocks are
    empty skeletons by now), forced on the record widened, each block answered from it."""
    ref64 = float64_copy(ref)
    wide, arg_names = as_fp64(inputs), calls[ROOT].arg_names
    with _answered(ts, ref64, {n: calls[n] for n in block_records}, widen=True), float64_through_casts(spec):
        return forced_truth(ts, ref64, calls, params, lambda widened: feed(ts, spec, wide, None, arg_names),
                            forced=forced)


def align_streamed(spec: ModelSpec, config: str, checkpoint: Path, progress: Progress = lambda s: None,
                   command: str = "", only: tuple[str, ...] = (), keep: tuple[str, ...] = ()) -> Report:
    """Align `spec` on `checkpoint` block by block (fp32, teacher-forced); returns a Report.

    `only`: report just the modules matching these globs. A block with none of them inside
    is not loaded on the port's side at all (the reference's still runs, to hand its
    gradient on, down to the lowest chosen block). The shell (embeddings, final norm, head,
    loss) is forced only if a module of it is chosen: with a large vocabulary it costs more
    than a block, and its embeddings' gradient needs the reference's backward through every
    block. Without it the report has no model outputs and says so (Report.shell_judged).
    `keep`: module globs whose tensors are kept in full (Report.kept, see compare.keep).
    """
    from align.weights.checkpoint import Checkpoint

    if not spec.stream_blocks:
        raise ConfigError(spec.source, f"models.{spec.name}.stream.blocks",
                          'missing: name the reference\'s block list (e.g. "model.layers") to stream layers')
    stream = _Stream(spec, config, only, keep, progress)
    with Checkpoint(checkpoint) as ckpt, scratch("spill") as scratch_dir:
        stream.plan(ckpt)
        stream.reference_pass(Spill(scratch_dir, progress))
        for i, b in reversed(list(enumerate(stream.recorder.seen))):
            if i < stream.lowest and not stream.shell_judged:
                progress(f"blocks 1-{i + 1}: --only chose nothing in them nor in the shell: not run")
                break
            stream.block(i, b)
        stream.shell()
    env = environment(reference_environment(), port_environment(), {"init": None, "inputs": spec.inputs.seed})
    j = stream.judgement
    j.missing_grads(stream.graded)
    order = stream.order
    j.layers.sort(key=lambda layer: order[layer.name][0])
    run = j.run(tolerance_policy(spec) + "; layer-streamed", sorted(order, key=lambda n: order[n][1]),
                sorted(order, key=lambda n: order[n][0])[::-1])
    return Report(
        model=spec.name, config=config, port=spec.port_class, runs=(run,), outputs=tuple(j.outputs),
        param_grads=tuple(j.param_grads), input_grads=tuple(j.input_grads), weights=stream.loader.weight_map(),
        unpaired=tuple(j.unpaired),
        env=env, command=command or f"align run {spec.name} --stream-layers", path="stream", created=now(),
        checkpoint=str(checkpoint),
        observer=(Observer("torch", True, True, (), checked=False), Observer("paddle", True, True, (), checked=False)),
        warnings=tuple(j.warnings), only=tuple(only), shell_judged=stream.shell_judged, kept=tuple(j.kept),
        judging=spec.judging,
    )


class _Stream:
    """One streamed alignment's state, as align_streamed takes it through its passes."""

    def __init__(self, spec: ModelSpec, config: str, only: tuple[str, ...], keep: tuple[str, ...],
                 progress: Progress):
        from align.capture.paddle_side import PaddleSide
        from align.capture.torch_side import TorchSide

        self.spec, self.only, self.progress = spec, only, progress
        self.blocks = spec.stream_blocks
        self.ts, self.ps = TorchSide(), PaddleSide()
        self.rules = W.load_rules(spec.weights_file)
        self.cfg = builders.reference_config(spec, config)
        progress("building both models as skeletons (no weights)")
        self.ref = builders.reference_skeleton(spec, self.cfg)
        self.ref_modules = [n or ROOT for n, _ in self.ref.named_modules()]
        for flag, globs in (("--only", only), ("--keep", keep)):
            require_matching(spec, flag, globs, self.ref_modules)
        self.port = builders.port_skeleton(spec, builders.values_of(self.cfg))
        self.port_modules = {ROOT} | {n for n, _ in self.port.named_sublayers()}
        self.judgement = Judgement(spec, self.rules, "float32", only, keep)
        self.graded: set[str] = set()  # every reference parameter that got a gradient, in a part judged

    def rename(self, module: str) -> str:
        return self.rules.rename_module(module)[0]

    def to_reference(self, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return as_reference(grads, self.loader.wmap)

    def plan(self, ckpt: Any) -> None:
        slots = W.describe_slots(self.port.state_dict(), dict(self.port.named_sublayers(include_self=True)))
        wmap = W.plan(self.rules, ckpt.shapes(), slots, builders.values_of(self.cfg))
        self.loader = Loader(ckpt, wmap, self.ref, self.port, self.rename)
        self.inputs = builders.make_inputs(self.spec, builders.values_of(self.cfg))

    def reference_pass(self, spill: Spill) -> None:
        """The reference whole, its shell with gradients and each block without (see
        _ShellRecorder); its shell's large gradients set aside in `spill`."""
        ts, ref, only = self.ts, self.ref, self.only
        self.progress("reference: the shell with gradients, each block without")
        self.loader.load_ref("", exclude=self.blocks)
        recorder = self.recorder = _ShellRecorder(ts, self.blocks, self.loader)
        with hooked(ts, ref, recorder) as calls:
            ts.backward(backward_seed(ts, self.spec)(feed(ts, self.spec, self.inputs)(ref)))
        # Its snapshot cache holds the shell's outputs, whose graphs hold the shell's weights.
        recorder.forget()
        self.order = {n: (c.start, c.end) for n, c in calls.items()}  # every call, blocks' insides too
        self.ref_calls = {n: c for n, c in calls.items() if not recorder.inside(c.module)}
        self.shell_judged = not only or any(selected(c.module, only) for c in self.ref_calls.values()
                                            if not recorder.is_block(c.module))
        self.shell_params = {k: p for k, p in ref.named_parameters() if not within(k, self.blocks)}
        self.spill = spill
        if self.shell_judged:
            spill.set_aside(ts, self.shell_params)
        else:  # nothing will be judged against them
            for p in self.shell_params.values():
                p.grad = None
        self.lowest = min((i for i, b in enumerate(recorder.seen)
                           if not only or any(selected(m, only) for m in self.ref_modules if within(m, b.name))),
                          default=len(recorder.seen))

    def block(self, i: int, b: _Block) -> None:
        """Block `b` again in the reference, under hooks, seeded with the gradient its output
        received; then, if --only chose anything in it, its port twin forced on that record."""
        import torch

        ts, ps, spec = self.ts, self.ps, self.spec
        count = len(self.recorder.seen)
        self.progress(f"block {i + 1}/{count} ({b.name}): reference, then port on its inputs")
        grads = {p: leaf.grad for p, leaf in b.leaves if leaf.grad is not None}
        if not grads:
            raise ConfigError(spec.source, f"models.{spec.name}.stream.blocks",
                              f"no gradient reached {b.name}'s output: the blocks must feed each other directly")
        self.loader.load_ref(b.name)
        module = ts.submodule(self.ref, b.name)
        with hooked(ts, module, Recorder(ts, keep_inputs=True), prefix=b.name) as inner:
            outs = dict(flatten(module(*b.args, **b.kwargs), ts))
            torch.autograd.backward([outs[p] for p in grads], list(grads.values()))
        # Their graph outlives its backward, and its gradient-accumulating nodes hold the
        # parameters they fed: this block's, and (from the first block, whose input is the
        # embedding's output) the 2.4 GB embedding. Kept, they outlived free_ref.
        del outs, grads
        block_calls = dict(inner)
        self.ref_calls[b.name] = block_calls[b.name]
        wanted = any(selected(c.module, self.only) for c in block_calls.values())
        # This block's parameter gradients live only while its port twin is judged.
        own = {k: ts.record(p.grad).data for k, p in self.ref.named_parameters()
               if wanted and within(k, b.name) and p.grad is not None}
        self.graded.update(own)
        self.loader.free_ref(b.name)
        b.args, b.kwargs, b.leaves = (), {}, []
        if not wanted:
            self.progress(f"block {i + 1}/{count} ({b.name}): no --only module inside, port not loaded")
            return
        port_name = self.rename(b.name)
        self.loader.load_port(b.name)
        port_block = ps.submodule(self.port, port_name)
        pairing = pair_calls([(n, c.module) for n, c in block_calls.items()], self.port_modules,
                             self.rules.rename_module)
        judged, judge = self.judgement.judge()
        forcer = _force_block(ps, port_block, port_name, b.name, block_calls, {p.port: p.ref for p in pairing.pairs},
                              judge, own, self.to_reference, call_kwargs(spec, b.name))
        ps.clear_grads(port_block)
        self.loader.free_port(b.name)
        if judged.deferred:  # the float64 truth, for what failed the literal rule: the block again
            self.progress(f"block {i + 1}/{count} ({b.name}): {len(judged.deferred)} comparisons fail the literal "
                          "tolerance: the reference block again in float64")
            self.loader.load_ref(b.name)
            judged.settle(_block_truth(spec, ts, module, b.name, block_calls, own, {p.ref for p in pairing.pairs}))
            self.loader.free_ref(b.name)
        self.judgement.record(judged, forcer, list(pairing.pairs), block_calls, pairing.unpaired)

    def shell(self) -> None:
        """The port's shell, forced, each block answered from the reference's record: the code
        around the blocks (embeddings, masks, norm, head, loss) and its parameter gradients."""
        ts, ps, spec, blocks, ref_calls = self.ts, self.ps, self.spec, self.blocks, self.ref_calls
        block_records = {n for n in ref_calls if self.recorder.is_block(n)}
        late = {k: p.grad for k, p in self.shell_params.items()} if self.shell_judged else {}
        shell_params = set(self.shell_params)
        self.loader.free_ref("", exclude=blocks)
        del self.recorder, self.shell_params
        # What is left of the reference's graphs sits in reference cycles (hooks and the
        # records they fill) and still holds its shell's weight and gradient, otherwise freed
        # by the collector only midway through the port's shell (with the full-size shell:
        # 8.4 GB RSS before the port's shell without this, 3.3 GB with it).
        gc.collect()
        shell_grads = self.spill.totals(ts, late)  # empties `late`: the gradients go as they are read
        self.graded.update(shell_grads)
        if not self.shell_judged:
            self.progress("port: the shell not run (--only chose no module of it)")
            return
        self.progress("port: the shell, forced, each block answered from the reference's record")
        self.loader.load_port("", exclude=blocks)
        pairing = pair_calls([(n, c.module) for n, c in ref_calls.items()], self.port_modules, self.rules.rename_module)
        port = self.port

        def make() -> Feed:
            return feed(ps, spec, inputs_for_port(self.inputs, spec), call_kwargs(spec, ROOT),
                        ref_calls[ROOT].arg_names)

        judged, judge = self.judgement.judge()
        with _answered(ps, port, {self.rename(n): ref_calls[n] for n in block_records}):
            forcer = force(ps, port, make, ref_calls, {p.port: p.ref for p in pairing.pairs}, judge, shell_grads,
                           self.to_reference)
        self.loader.free_port("", exclude=blocks)
        # The blocks answered from their record are judged in their own passes: what this pass
        # saw of them (their inputs' gradients, which nothing sends back here) is not theirs.
        judged.forget(block_records)
        if judged.deferred:  # the float64 truth, for what failed the literal rule: the shell again
            self.progress(f"reference: {len(judged.deferred)} comparisons of the shell fail the literal tolerance: "
                          "the shell again in float64 (a float64 copy of it: twice its weights)")
            self.loader.load_ref("", exclude=blocks)
            judged.settle(_shell_truth(ts, spec, self.ref, ref_calls, block_records, self.inputs, shell_params,
                                       {p.ref for p in pairing.pairs}))
            self.loader.free_ref("", exclude=blocks)
        del shell_grads  # and so its memory maps, before their directory goes
        self.judgement.record(judged, forcer, [p for p in pairing.pairs if p.ref not in block_records], ref_calls,
                              [u for u in pairing.unpaired if not within(u.name.split("#")[0], blocks)], model=True)
