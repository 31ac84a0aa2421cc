"""Layer-streamed alignment: a decoder stack larger than memory, one block at a time.

Both models are built as skeletons (torch on the meta device, Paddle under LazyGuard): no
weight is allocated. Weights come from a memory-mapped safetensors checkpoint, one unit at
a time, and are freed after use. Memory is then about one block per framework, plus the
shell (embeddings, final norm, head) of one framework at a time, plus the activations at
the block boundaries. The reference shell's large gradients wait on disk in between (_Spill).

1. The reference runs whole with its shell loaded; each block is loaded for its call, run
   without gradients, recorded, freed, and its output cut into a fresh leaf. The loss's
   backward reaches the last block's output leaf.
2. Blocks last to first: the reference block is loaded and run again on its recorded inputs,
   under hooks, seeded with the gradient its output leaf received. That sends the gradient
   on to the previous block's output leaf (from the first block, into the embeddings). The
   port's block is loaded and forced on that record (align.force): every module inside is
   judged on its own, forward and backward. Both blocks are freed.
3. The port's shell is loaded and forced on the reference's record, each block call
   answered from the record instead of run: this judges the code around the blocks
   (embedding scale, masks, norm, head, loss) and the shell's parameter gradients.

With a noise floor (tolerance.noise_floor), a float64 copy of each reference block, and of
the shell, is forced on its record widened (as run._fp64_run does for the whole model), and
gives the truth its port twin is judged against.

Blocks must feed each other directly (block k's output is block k+1's input, as in
transformers' decoder stacks); a model with code between them is refused, not misjudged.
"""

from __future__ import annotations

import fnmatch
import functools
import gc
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from align import weights as W
from align.capture import ROOT, Arr, Call, Recorder, _snapshot, flatten, hooked, map_inputs, map_tensors
from align.compare import BACKWARD, FORWARD, TEACHER_FORCED, Collector, Keeper, RunResult, TensorResult, Tolerances, \
    culprits, first_divergence
from align.force import Forcer, Judge, ToReference, force_call
from align.metrics import CHUNK, missing
from align.pair import Unpaired, pair_calls
from align.spec import ConfigError, ModelSpec, require_matching

Progress = Callable[[str], None]


def _under(key: str, prefix: str) -> bool:
    return not prefix or key == prefix or key.startswith(prefix + ".")


class Loader:
    """Puts weights into both skeletons from the checkpoint, a module subtree at a time, and
    takes them out again. Every port tensor loaded is read back and checked bit-exact."""

    def __init__(self, ckpt: Any, wmap: W.WeightMap, ref: Any, port: Any, rename: Callable[[str], str]):
        import torch

        self.torch, self.ckpt, self.wmap, self.rename = torch, ckpt, wmap, rename
        # A tied reference parameter is one Parameter under several names: loaded once.
        self.slots: dict[str, list[tuple[Any, str]]] = {}
        self.first_name: dict[str, str] = {}
        by_id: dict[int, str] = {}
        for mod_name, mod in ref.named_modules():
            for attr, p in mod.named_parameters(recurse=False):
                key = f"{mod_name}.{attr}" if mod_name else attr
                first = by_id.setdefault(id(p), key)
                self.slots.setdefault(first, []).append((mod, attr))
                self.first_name[key] = first
        self.port_state = port.state_dict()
        self.checked: dict[str, W.WeightEntry] = {}

    def _ref_keys(self, prefix: str, exclude: str | None) -> list[str]:
        return sorted({first for key, first in self.first_name.items()
                       if _under(key, prefix) and not (exclude and _under(key, exclude))})

    def _port_entries(self, prefix: str, exclude: str | None) -> list[W.WeightEntry]:
        p, x = self.rename(prefix) if prefix else "", self.rename(exclude) if exclude else None
        return [e for e in self.wmap.written() if any(_under(t, p) and not (x and _under(t, x)) for t in e.targets)]

    def load_ref(self, prefix: str, exclude: str | None = None) -> None:
        torch = self.torch
        for first in self._ref_keys(prefix, exclude):
            names = [k for k, f in self.first_name.items() if f == first]
            stored = next((k for k in names if k in self.ckpt.where), None)
            if stored is None:
                raise ConfigError(self.ckpt.path, "", f"has no tensor for the reference's {first}")
            param = torch.nn.Parameter(torch.from_numpy(np.array(self.ckpt.get(stored))))
            for mod, attr in self.slots[first]:
                mod._parameters[attr] = param
            self.ckpt.release(stored)

    def free_ref(self, prefix: str, exclude: str | None = None) -> None:
        torch = self.torch
        for first in self._ref_keys(prefix, exclude):
            mod, attr = self.slots[first][0]
            old = mod._parameters[attr]
            meta = torch.nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device="meta"))
            for mod, attr in self.slots[first]:
                mod._parameters[attr] = meta

    def load_port(self, prefix: str, exclude: str | None = None) -> None:
        entries = self._port_entries(prefix, exclude)
        for e in entries:
            for target, arr in W.build_targets(e, self.ckpt.get).items():
                self.port_state[target].set_value(arr)
        checked = W.verify(W.WeightMap(tuple(entries)), _Source(self.ckpt), lambda k: _read_back(self.port_state[k]))
        self.checked.update({e.target: e for e in checked.entries})
        for e in entries:
            for k in e.sources:
                self.ckpt.release(k)

    def free_port(self, prefix: str, exclude: str | None = None) -> None:
        for e in self._port_entries(prefix, exclude):
            for target in e.targets:
                self.port_state[target]._clear_data()

    def weight_map(self) -> W.WeightMap:
        return W.WeightMap(tuple(self.checked.get(e.target, e) for e in self.wmap.entries),
                           self.wmap.unmapped, self.wmap.unwritten)


def _read_back(t: Any) -> np.ndarray:
    """A loaded port tensor as numpy, to check its bytes: a view where DLPack gives one (a
    full-size shell's 2.4 GB embedding was copied to be checked, twice with the tied head),
    else Paddle's own copy (bf16 comes back as its uint16 words, as the checkpoint holds them)."""
    try:
        return np.from_dlpack(t.detach())
    except (BufferError, RuntimeError, TypeError, ValueError):
        return t.numpy()


# A reference shell gradient at least this large waits on disk while the blocks run (_Spill).
SPILL_BYTES = 1 << 28


def _in_memory(path: Path, mountinfo: list[str] | None = None) -> bool:
    """Whether `path` lies on a filesystem held in memory (tmpfs, ramfs: /tmp on many
    distributions), where a gradient set aside would take as much memory as before."""
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo") as f:
                mountinfo = f.readlines()
        except OSError:
            return False
    target, best, kind = str(path.resolve()), -1, ""
    for line in mountinfo:
        fields, _, rest = line.partition(" - ")
        point = fields.split()[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best and rest.split():  # the last mount on a point is the one seen
            best, kind = len(point), rest.split()[0]
    return kind in ("tmpfs", "ramfs")


class _Spill:
    """The reference shell's large parameter gradients, set aside on disk from the end of
    the reference's first pass until the port's shell is judged against them, memory-mapped
    back then. Without it they sit in memory through every block's pass and next to the
    port's whole shell: a full-size Gemma2's tied embedding gradient alone is 2.36 GB.

    The first pass leaves in them what the code above the blocks sent back (the tied head's
    part); it is written out and the gradient cleared. What the blocks' backward adds later
    (the embedding lookup's part, from the first block) is summed back in at the end, in the
    gradient's float dtype as torch accumulates it: a + b equals b + a exactly, so with one
    later part the total is bitwise what torch would have held."""

    def __init__(self, directory: str, progress: Progress):
        self.dir, self.progress = Path(directory), progress
        self.early: dict[str, tuple[Path, np.dtype, tuple[int, ...]]] = {}
        self.files = 0
        self.in_memory = _in_memory(self.dir)
        self.told: set[str] = set()  # the gradients kept in memory, each said once

    def write(self, arr: np.ndarray, path: Path | None = None) -> Path:
        if path is None:
            path, self.files = self.dir / f"{self.files}.bin", self.files + 1
        with open(path, "wb") as f:
            arr.tofile(f)
        return path

    def _spillable(self, fw: Any, name: str, g: Any) -> bool:
        """A contiguous float gradient of at least SPILL_BYTES, with room for it on disk."""
        if fw.nbytes(g) < SPILL_BYTES or fw.dtype_name(g) not in ("float32", "float64") or not g.is_contiguous():
            return False
        why = (f"{self.dir} is itself in memory (tmpfs); a TMPDIR on disk lowers the peak" if self.in_memory
               else f"too little free space in {self.dir}" if shutil.disk_usage(self.dir).free < fw.nbytes(g) + (1 << 30)
               else None)
        if why is not None and name not in self.told:
            self.told.add(name)
            self.progress(f"reference: {name}'s gradient kept in memory: {why}")
        return why is None

    def set_aside(self, fw: Any, params: dict[str, Any]) -> None:
        """Write out, and clear, each gradient that is _spillable."""
        for name, p in params.items():
            if p.grad is not None and self._spillable(fw, name, p.grad):
                arr = fw.view(p.grad)
                self.early[name] = (self.write(arr), arr.dtype, arr.shape)
                p.grad = None
        if self.early:
            gb = sum(path.stat().st_size for path, _, _ in self.early.values()) / 1e9
            self.progress(f"reference: {gb:.2f} GB of its shell's gradients set aside in {self.dir}")

    def totals(self, fw: Any, grads: dict[str, Any]) -> dict[str, np.ndarray]:
        """Each parameter's whole gradient, from `grads` (what each .grad holds now; the
        caller's other references to them must be gone for their memory to go). Whatever
        was set aside, or is _spillable, is memory-mapped from disk, with any later part
        added in first (a gradient the blocks' backward alone sent, such as an untied
        embedding's, goes straight to disk rather than being copied); the rest is copied."""
        out = {}
        for name in list(grads):
            later = grads.pop(name)
            early = self.early.get(name)
            if early is None and (later is None or not self._spillable(fw, name, later)):
                if later is not None:
                    out[name] = fw.record(later).data
                continue
            if later is not None:
                total = fw.view(later)  # the gradient's own buffer, summed into in place
                if early is not None:
                    flat = total.reshape(-1)
                    with open(early[0], "rb") as f:
                        for start in range(0, flat.size, CHUNK):
                            part = np.fromfile(f, early[1], min(CHUNK, flat.size - start))
                            np.add(flat[start:start + part.size], part, out=flat[start:start + part.size])
                early = (self.write(total, early[0] if early else None), total.dtype, total.shape)
                del later, total
            out[name] = np.memmap(early[0], early[1], "r", shape=early[2])
        return out


class _Source(Mapping):
    """The checkpoint as W.verify reads it: key -> array, mapped on demand."""

    def __init__(self, ckpt: Any):
        self.ckpt = ckpt

    def __getitem__(self, key: str) -> np.ndarray:
        return self.ckpt.get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.ckpt.where)

    def __len__(self) -> int:
        return len(self.ckpt.where)


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
        record = Call(call.name, call.module, call.type, call.start, arg_names=call.arg_names)
        record.args, record.kwargs = _snapshot(args, self.fw), _snapshot(kwargs, self.fw)
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
def _answered(fw: Any, port: Any, records: dict[str, Call]) -> Iterator[None]:
    """The port's blocks answer their calls from the reference's record instead of running
    (each block's own code is judged on its own). Instance attributes, removed on exit."""
    patched = []
    for path, record in records.items():
        block = fw.submodule(port, path)

        @functools.wraps(block.forward)  # keeps the signature: its inputs are named as the real one's
        def answer(*args: Any, record: Call = record, **kwargs: Any) -> Any:
            outs = {p: fw.tensor(a, requires_grad=a.dtype.startswith("float")) for p, a in record.outputs.items()}
            return outs["out"] if list(outs) == ["out"] else tuple(outs[str(i)] for i in range(len(outs)))

        block.forward = answer
        patched.append(block)
    try:
        yield
    finally:
        for block in patched:
            del block.forward


def _block_inputs(ps: Any, module: Any, call: Call, extra: dict) -> tuple[tuple, dict, list]:
    """A recorded call's inputs as the port block takes them; those the reference sent a
    gradient back to as leaves, whose gradients are then judged."""
    accepted = ps.accepted_kwargs(module)
    leaves = []

    def make(path: str, a: Arr) -> Any:
        t = ps.tensor(a, requires_grad=path in call.input_grads)
        if path in call.input_grads:
            leaves.append((path, t))
        return t

    kwargs = {k: v for k, v in call.kwargs.items() if accepted is None or k in accepted}
    args, kwargs = map_inputs(call.args, kwargs, call.arg_names, None, make)
    kwargs.update({k: v for k, v in extra.items() if accepted is None or k in accepted})
    return args, kwargs, leaves


def _force_block(ps: Any, block: Any, port_name: str, ref_name: str, calls: dict[str, Call], to_ref: dict[str, str],
                 judge: Judge, ref_param_grads: dict[str, np.ndarray], to_reference: ToReference,
                 extra: dict) -> Forcer:
    """One port block forced on its reference record, inputs and all: the gradients that
    come back to its inputs are judged as its own."""
    leaves: list[tuple[str, Any]] = []

    def run() -> None:
        args, kwargs, made = _block_inputs(ps, block, calls[ref_name], extra)
        leaves[:] = made  # this attempt's
        block(*args, **kwargs)

    forcer = force_call(ps, block, run, calls, to_ref, judge, ref_param_grads, to_reference, prefix=port_name)
    for path, leaf in leaves:
        g = ps.grad(leaf)
        ref_g = calls[ref_name].input_grads[path]
        judge.compare(ref_name, BACKWARD, f"grad of input {path}", np.zeros_like(ref_g) if g is None else g, ref_g)
    return forcer


def _block_truth(ts: Any, block: Any, name: str, calls: dict[str, Call], grads: dict[str, np.ndarray]) -> dict:
    """The noise floor's truth for one block: a float64 copy of the reference block, forced
    on its own record widened, as run._fp64_run does for the whole model (a Keeper keeps
    what it gives, under the labels the port's forced pass uses)."""
    from align.run import float64_copy, widened_calls

    keeper, widened = Keeper(), widened_calls(calls)
    _force_block(ts, float64_copy(block), name, name, widened, {n: n for n in widened}, keeper, grads,
                 lambda key, g: {key: g}, {})
    return keeper.kept


def _shell_truth(ts: Any, ref: Any, calls: dict[str, Call], block_records: set[str], inputs: dict[str, Arr],
                 params: set[str]) -> dict:
    """The noise floor's truth for the shell: a float64 copy of the reference (its blocks are
    empty skeletons by now), forced on the record widened, each block answered from it."""
    from align.run import _as_fp64, float64_copy, widened_calls

    keeper, widened, ref64 = Keeper(), widened_calls(calls), float64_copy(ref)

    def run() -> None:
        with _answered(ts, ref64, {n: widened[n] for n in block_records}):
            ref64(**{k: ts.tensor(a, False) for k, a in _as_fp64(inputs).items()})

    # The Keeper keeps what the copy gives and reads no reference value: naming the
    # parameters whose gradients to keep is enough.
    force_call(ts, ref64, run, widened, {n: n for n in widened}, keeper, dict.fromkeys(params), lambda key, g: {key: g})
    return keeper.kept


def align_streamed(spec: ModelSpec, config: str, checkpoint: Path, progress: Progress = lambda s: None,
                   command: str = "", only: tuple[str, ...] = (), keep: tuple[str, ...] = ()) -> Any:
    """Align `spec` on `checkpoint` block by block (fp32, teacher-forced); returns a Report.

    `only`: report just the modules matching these globs. A block with none of them inside
    is not loaded on the port's side at all (the reference's still runs, to hand its
    gradient on, down to the lowest chosen block). The shell (embeddings, final norm, head,
    loss) is forced only if a module of it is chosen: with a large vocabulary it costs more
    than a block, and its embeddings' gradient needs the reference's backward through every
    block. Without it the report has no model outputs and says so (Report.shell_judged).
    `keep`: module globs whose tensors are kept in full (Report.kept, see align.keep).
    """
    import torch

    from align import build
    from align.checkpoint import Checkpoint
    from align.diagnose import Observer, environment, port_environment, reference_environment
    from align.paddle_side import PaddleSide
    from align.keep import keeping
    from align.run import (FORCED_TWICE, Report, _as_reference, _call_kwargs_for, _forced_layers, _port_inputs, _seed,
                           selected, tolerance_policy)
    from align.torch_side import TorchSide

    blocks = spec.stream_blocks
    if not blocks:
        raise ConfigError(spec.source, f"models.{spec.name}.stream.blocks",
                          'missing: name the reference\'s block list (e.g. "model.layers") to stream layers')
    ts, ps = TorchSide(), PaddleSide()
    rules = W.load_rules(spec.weights_file)

    def rename(module: str) -> str:
        return rules.rename_module(module)[0]

    cfg = build.reference_config(spec, config)
    tolerances = Tolerances(spec.tolerance, spec.overrides)
    noise = spec.noise_floor  # its truth comes from a float64 copy of each part, made beside it
    factor = noise.factor if noise else None
    progress("building both models as skeletons (no weights)")
    ref = build.reference_skeleton(spec, cfg)
    ref_modules = [n or ROOT for n, _ in ref.named_modules()]
    for flag, globs in (("--only", only), ("--keep", keep)):
        require_matching(spec, flag, globs, ref_modules)
    port = build.port_skeleton(spec, cfg.to_dict())
    port_modules = {ROOT} | {n for n, _ in port.named_sublayers()}
    keepers: list[Any] = []  # one per forced pass, with --keep

    def judging(collector: Collector) -> Any:
        judge, keeper = keeping(collector, keep, "float32", TEACHER_FORCED)
        keepers.extend([keeper] if keeper else [])
        return judge

    def to_reference(key: str, g: np.ndarray) -> dict[str, np.ndarray]:
        return _as_reference({key: g}, wmap)

    found = Collector(tolerances)  # every block's comparisons; the shell's go to their own
    layers, unpaired = [], []
    with Checkpoint(checkpoint) as ckpt, tempfile.TemporaryDirectory(prefix="align-spill-") as scratch:
        slots = W.describe_slots(port.state_dict(), dict(port.named_sublayers(include_self=True)))
        wmap = W.plan(rules, ckpt.shapes(), slots, cfg.to_dict())
        loader = Loader(ckpt, wmap, ref, port, rename)
        inputs = build.make_inputs(spec, cfg)

        progress("reference: the shell with gradients, each block without")
        loader.load_ref("", exclude=blocks)
        recorder = _ShellRecorder(ts, blocks, loader)
        with hooked(ts, ref, recorder) as calls:
            ts.backward(_seed(ts, spec)(ref(**{k: ts.tensor(a, False) for k, a in inputs.items()})))
        # Its snapshot cache holds the shell's outputs, whose graphs hold the shell's weights.
        recorder.forget()
        order = {n: (c.start, c.end) for n, c in calls.items()}  # every call, blocks' insides too
        ref_calls = {n: c for n, c in calls.items() if not recorder.inside(c.module)}
        graded: set[str] = set()  # every reference parameter that got a gradient, in a part judged
        judged_names: list[str] = []  # every reference call the port was forced on (param grads are theirs)
        twice = False  # some forced pass was made again with one backward (see force.eager_or_once)
        shell_judged = not only or any(selected(c.module, only) for c in ref_calls.values()
                                       if not recorder.is_block(c.module))
        shell_params = {k: p for k, p in ref.named_parameters() if not _under(k, blocks)}
        spill = _Spill(scratch, progress)
        if shell_judged:
            spill.set_aside(ts, shell_params)
        else:  # nothing will be judged against them
            for p in shell_params.values():
                p.grad = None
        lowest = min((i for i, b in enumerate(recorder.seen)
                      if not only or any(selected(m, only) for m in ref_modules if _under(m, b.name))),
                     default=len(recorder.seen))

        for i, b in reversed(list(enumerate(recorder.seen))):
            if i < lowest and not shell_judged:
                progress(f"blocks 1-{i + 1}: --only chose nothing in them nor in the shell: not run")
                break
            progress(f"block {i + 1}/{len(recorder.seen)} ({b.name}): reference{' (and in float64)' if noise else ''}, "
                     "then port on its inputs")
            grads = {p: leaf.grad for p, leaf in b.leaves if leaf.grad is not None}
            if not grads:
                raise ConfigError(spec.source, f"models.{spec.name}.stream.blocks",
                                  f"no gradient reached {b.name}'s output: the blocks must feed each other directly")
            loader.load_ref(b.name)
            module = ts.submodule(ref, b.name)
            with hooked(ts, module, Recorder(ts, keep_inputs=True), prefix=b.name) as inner:
                outs = dict(flatten(module(*b.args, **b.kwargs), ts))
                torch.autograd.backward([outs[p] for p in grads], list(grads.values()))
            # Their graph outlives its backward, and its gradient-accumulating nodes hold the
            # parameters they fed: this block's, and (from the first block, whose input is the
            # embedding's output) the 2.4 GB embedding. Kept, they outlived free_ref.
            del outs, grads
            block_calls = dict(inner)
            ref_calls[b.name] = block_calls[b.name]
            wanted = not only or any(selected(c.module, only) for c in block_calls.values())
            # This block's parameter gradients live only while its port twin is judged.
            own = {k: ts.record(p.grad).data for k, p in ref.named_parameters()
                   if wanted and _under(k, b.name) and p.grad is not None}
            graded.update(own)
            truth = _block_truth(ts, module, b.name, block_calls, own) if noise and wanted else None
            loader.free_ref(b.name)
            b.args, b.kwargs, b.leaves = (), {}, []
            if not wanted:
                progress(f"block {i + 1}/{len(recorder.seen)} ({b.name}): no --only module inside, port not loaded")
                continue

            port_name = rename(b.name)
            loader.load_port(b.name)
            port_block = ps.submodule(port, port_name)
            pairing = pair_calls([(n, c.module) for n, c in block_calls.items()], port_modules, rules.rename_module)
            judged = Collector(tolerances, truth, factor)
            forcer = _force_block(ps, port_block, port_name, b.name, block_calls, {p.port: p.ref for p in pairing.pairs},
                                  judging(judged), own, to_reference, _call_kwargs_for(spec, b.name))
            found.absorb(judged)
            twice = twice or not forcer.eager
            judged_names += [p.ref for p in pairing.pairs]
            layers += _forced_layers([p for p in pairing.pairs if selected(p.ref_module, only)], block_calls, forcer,
                                     found, tolerances)
            unpaired += pairing.unpaired
            ps.clear_grads(port_block)
            loader.free_port(b.name)

        block_records = {n for n in ref_calls if recorder.is_block(n)}
        shell_truth = None
        if shell_judged and noise:
            progress("reference: the shell again in float64 (noise floor)")
            shell_truth = _shell_truth(ts, ref, ref_calls, block_records, inputs, set(shell_params))
        late = {k: p.grad for k, p in shell_params.items()} if shell_judged else {}
        loader.free_ref("", exclude=blocks)
        del ref, recorder, calls, shell_params
        # What is left of the reference's graphs sits in reference cycles (hooks and the
        # records they fill) and still holds its shell's weight and gradient, otherwise freed
        # by the collector only midway through the port's shell (with the full-size shell:
        # 8.4 GB RSS before the port's shell without this, 3.3 GB with it).
        gc.collect()
        shell_grads = spill.totals(ts, late)  # empties `late`: the gradients go as they are read
        graded.update(shell_grads)
        shell = Collector(tolerances, shell_truth, factor)
        if shell_judged:
            progress("port: the shell, forced, each block answered from the reference's record")
            loader.load_port("", exclude=blocks)
            pairing = pair_calls([(n, c.module) for n, c in ref_calls.items()], port_modules, rules.rename_module)
            shell_pairs = [p for p in pairing.pairs if p.ref not in block_records]

            def run() -> None:
                with _answered(ps, port, {rename(n): ref_calls[n] for n in block_records}):
                    port(**{k: ps.tensor(a, False) for k, a in _port_inputs(inputs, spec).items()},
                         **_call_kwargs_for(spec, ROOT))

            forcer = force_call(ps, port, run, ref_calls, {p.port: p.ref for p in pairing.pairs}, judging(shell),
                                shell_grads, to_reference)
            twice = twice or not forcer.eager
            judged_names += [p.ref for p in shell_pairs]
            layers += _forced_layers([p for p in shell_pairs if selected(p.ref_module, only)], ref_calls, forcer,
                                     shell, tolerances)
            unpaired += [u for u in pairing.unpaired if not _under(u.name.split("#")[0], blocks)]
            loader.free_port("", exclude=blocks)
        else:
            progress("port: the shell not run (--only chose no module of it)")
        del shell_grads, shell_truth  # and so its memory maps, before their directory goes

    layers = sorted(layers, key=lambda layer: order[layer.name][0])
    fwd_order = sorted(order, key=lambda n: order[n][1])
    bwd_order = sorted(order, key=lambda n: order[n][0])[::-1]
    policy = tolerance_policy(spec) + "; layer-streamed"
    run = RunResult("float32", TEACHER_FORCED, spec.tolerance, policy,
                    tuple(layers), first_divergence(tuple(layers), fwd_order, bwd_order),
                    culprits(tuple(layers), fwd_order, bwd_order))
    outputs = tuple(TensorResult(k, m, tolerances.for_name(k)) for k, m in shell.labelled(ROOT, FORWARD, "output "))
    param_grads = tuple(TensorResult(k, m, tolerances.for_name(k))
                        for collector in (found, shell) for name in judged_names
                        for k, m in collector.labelled(name, BACKWARD, "grad of parameter "))
    param_grads += tuple(TensorResult(k, missing("the port parameter got no gradient", k), tolerances.for_name(k))
                         for k in sorted(graded - {p.name for p in param_grads}))
    env = environment(reference_environment(), port_environment(), {"init": None, "inputs": spec.inputs.seed})
    return Report(
        model=spec.name, config=config, port=spec.port_class, runs=(run,), outputs=outputs,
        param_grads=param_grads, weights=loader.weight_map(),
        unpaired=tuple(u if not (why := rules.unpaired_reason(u.name.split("#")[0]))
                       else Unpaired(u.name, u.side, f"{why} ({rules.source.name})", allowed=True) for u in unpaired),
        env=env, command=command or f"align run {spec.name} --stream-layers", path="stream",
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), checkpoint=str(checkpoint),
        observer=(Observer("torch", True, True, (), checked=False), Observer("paddle", True, True, (), checked=False)),
        warnings=(FORCED_TWICE,) if twice else (), only=tuple(only), shell_judged=shell_judged,
        kept=tuple(k for keeper in keepers for k in keeper.kept),
    )
