"""The observer effect: instrumentation must not change what it measures.

Each model is run once with no hooks; its outputs and parameter gradients must be bitwise
identical to the instrumented run's (gradients within a few ulps of summation order). The
port's run without hooks goes on a copy of it, alongside the forced pass, where there is a
core and memory to spare for it.
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from align.capture.structure import as_feed, flatten
from align.capture.trace import Trace


@dataclass(frozen=True)
class Observer:
    framework: str
    outputs_identical: bool
    grads_identical: bool
    differing: tuple[str, ...]
    checked: bool = True  # False on the gate and layer-streamed paths, which skip the run without hooks
    # Worst parameter-gradient difference, in ulps of the model's largest gradient value.
    # Boundary identities add autograd nodes, which can reorder how torch sums a tensor's
    # gradient contributions: a rounding-level change, never a semantic one.
    grad_ulps: float = 0.0
    alongside: bool = False  # the run without hooks was made on a copy, alongside the instrumented ones

    @property
    def perturbed(self) -> bool:
        return self.checked and (not self.outputs_identical or self.grad_ulps > OBSERVER_ULPS)

    @property
    def state(self) -> str:
        if not self.checked:
            return "not checked (not run on this path)"
        if self.perturbed:
            return "DIFFERENT"
        if self.grads_identical:
            return "identical"
        return f"outputs identical, gradients within {self.grad_ulps:.1f} ulp (summation order)"

    def to_dict(self) -> dict:
        return {**asdict(self), "differing": list(self.differing), "perturbed": self.perturbed, "state": self.state}


OBSERVER_ULPS = 8.0  # allowance for summation order in the observer check's gradients


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.itemsize not in (1, 2, 4, 8):
        return a.tobytes() == b.tobytes()
    bits = f"u{a.dtype.itemsize}"  # bitwise: -0.0 is not 0.0, and a NaN equals the same NaN
    return bool(np.array_equal(np.ascontiguousarray(a).view(bits), np.ascontiguousarray(b).view(bits)))


@dataclass(frozen=True)
class Observed:
    """What a run without hooks gave: the model's outputs and its parameters' gradients."""

    outputs: dict[str, np.ndarray]
    grads: dict[str, np.ndarray | None]


def bare_run(fw: Any, model: Any, inputs: Any, seed_fn: Callable) -> Observed:
    """Forward and backward with no hooks on `inputs` (a Feed, or a dict of keyword arguments):
    the model's outputs and its parameters' gradients."""
    fw.clear_grads(model)
    output = as_feed(inputs)(model)
    fw.backward(seed_fn(output))
    outputs = {p: fw.view(t) for p, t in flatten(output, fw) if fw.is_tensor(t)}
    grads = {k: fw.grad(p) for k, p in fw.parameters(model).items()}
    fw.clear_grads(model)
    return Observed(outputs, grads)


def observer_copy(fw: Any, model: Any, activations: int) -> Any | None:
    """A copy of the model for its run without hooks to go alongside the instrumented runs
    (see alongside), if there is room for one and the model can be copied; None otherwise,
    and the run without hooks comes after the others.

    Paddle's CPU kernels keep to one core and release the GIL while they work, so on a
    machine with a second core that run costs next to no wall time. The copy holds bitwise
    the same weights and runs the same single-threaded kernels: its outputs and gradients
    are those the original would give (tests/test_diagnosis.py checks both ways).
    `activations` is about what a run keeps for its backward (Trace.output_bytes): the copy
    needs its weights, their gradients, that, and as much again for what boundaries miss."""
    weights = sum(fw.nbytes(t) for t in (*fw.parameters(model).values(), *fw.buffers(model).values()))
    if not room_alongside(2 * weights + 2 * activations):
        return None
    fw.clear_grads(model)
    try:
        return copy.deepcopy(model)
    except Exception:  # noqa: BLE001 - a model deepcopy cannot copy is checked the other way
        return None


def alongside(background: Callable[[], Any], foreground: Callable[[], Any]) -> tuple[Any, Any]:
    """Both results: `background()` run in a thread of its own while `foreground()` runs in
    this one. The thread is always waited for; an error in either reaches the caller."""
    done: dict[str, Any] = {}

    def run() -> None:
        try:
            done["result"] = background()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
            done["error"] = e

    thread = threading.Thread(target=run, name="align-alongside")
    thread.start()
    try:
        ahead = foreground()
    finally:
        thread.join()
    if "error" in done:
        raise done["error"]
    return done["result"], ahead


def room_alongside(nbytes: int) -> bool:
    """Whether a second run that needs `nbytes` can go alongside the first: a core to run
    on, and at most half of the memory the system has available."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return False  # unknown: the safe way is one run after another
    return cores >= 2 and nbytes < available / 2


def observer_check(fw: Any, model: Any, inputs: dict[str, Any], seed_fn: Callable, trace: Trace) -> Observer:
    """Run forward and backward with no hooks and compare bitwise with the recorded trace."""
    return judge_observed(fw.name, bare_run(fw, model, inputs, seed_fn), trace)


def judge_observed(framework: str, run: Observed, trace: Trace, alongside: bool = False) -> Observer:
    """A run without hooks against the instrumented run's trace: outputs bitwise, gradients
    bitwise or within OBSERVER_ULPS (summation order). `alongside`: that run was made on a
    copy, alongside the instrumented ones (see observer_copy)."""
    outputs, grads = run.outputs, run.grads
    out_diff = [k for k in set(outputs) | set(trace.outputs)
                if k not in outputs or k not in trace.outputs or not _same(outputs[k], trace.outputs[k].data)]
    grad_diff = [k for k in grads if not _same(grads[k], trace.param_grads.get(k))]
    # Summation-order rounding scales with the terms summed, not with the result (a key bias's
    # gradient is ~0 by softmax invariance, its rounding is not): ulps of the model's largest gradient.
    ulps = 0.0
    if grad_diff:
        scale = max((max(float(g.max()), -float(g.min())) for g in trace.param_grads.values() if g.size), default=0.0)
        ulps = max(_ulps(grads[k], trace.param_grads.get(k), scale) for k in grad_diff)
    return Observer(framework, not out_diff, not grad_diff, tuple(sorted(out_diff) + sorted(grad_diff)), grad_ulps=ulps,
                    alongside=alongside)


def _ulps(a: np.ndarray | None, b: np.ndarray | None, scale: float) -> float:
    """max|a - b| in ulps of `scale` (inf when only one exists, or the shapes differ)."""
    if a is None or b is None or a.shape != b.shape:
        return float("inf")
    unit = scale * float(np.finfo(b.dtype).eps if b.dtype.kind == "f" else 1.0)
    diff = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max(initial=0.0))
    return diff / unit if unit > 0 else (0.0 if diff == 0 else float("inf"))


