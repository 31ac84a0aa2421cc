"""The port's full tensors for the modules a user names (`align run --keep GLOB`).

A run keeps statistics only (see compare.Collector): memory does not grow with the model.
Chasing one module, a user may want its values themselves. For every comparison made for a
module matching a glob, in each dtype, the port's tensor is copied and kept beside the
reference's: teacher-forced, its outputs, the inputs it hands its children, the gradients
that come back to its inputs and its parameters' gradients; free-running, its outputs and
the gradients that reach them. The CLI writes them to `kept/` in the report
directory, whole or not at all: `tensors.safetensors`, and `index.json` naming each pair.
Memory grows with what the globs select, and only with that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from align.registry.spec import matches


@dataclass(frozen=True)
class KeptTensor:
    """One comparison, both sides in full."""

    dtype: str
    mode: str  # teacher_forced or free_running
    owner: str  # the reference call the compared code belongs to
    direction: str  # forward or backward
    label: str  # the tensor within the owner's comparisons, as the report names it
    port: np.ndarray
    reference: np.ndarray

    @property
    def key(self) -> str:
        return f"{self.dtype}|{self.mode}|{self.owner}|{self.label}"


class TensorKeeper:
    """A Judge (see align.force) that keeps a copy of what it is shown for the modules
    matching `globs`, as KeptTensor; it judges nothing."""

    def __init__(self, globs: tuple[str, ...], dtype: str, mode: str):
        self.globs, self.dtype, self.mode = globs, dtype, mode
        self.kept: list[KeptTensor] = []

    def compare(self, owner: str, direction: str, label: str, port: np.ndarray, ref: np.ndarray) -> None:
        if matches(owner.split("#")[0], self.globs):
            # The port's value may be written to later; the reference's is a record nobody writes.
            self.kept.append(KeptTensor(self.dtype, self.mode, owner, direction, label, np.array(port), ref))

    def fail(self, owner: str, direction: str, label: str, note: str) -> None:
        pass  # nothing to keep: the port had no such tensor

    def clear(self) -> None:
        self.kept = []


def keeping(judge: Any, globs: tuple[str, ...], dtype: str, mode: str) -> tuple[Any, TensorKeeper | None]:
    """The judge to show one pass: with `globs`, `judge` teamed (Tee) with a TensorKeeper of
    the pass's own, returned too (a pass made again forgets what it kept, and only that)."""
    if not globs:
        return judge, None
    keeper = TensorKeeper(globs, dtype, mode)
    return Tee(judge, keeper), keeper


class Tee:
    """A Judge that shows every comparison to several judges, in order."""

    def __init__(self, *judges):
        self.judges = judges

    def compare(self, owner: str, direction: str, label: str, port: np.ndarray, ref: np.ndarray) -> None:
        for j in self.judges:
            j.compare(owner, direction, label, port, ref)

    def fail(self, owner: str, direction: str, label: str, note: str) -> None:
        for j in self.judges:
            j.fail(owner, direction, label, note)

    def clear(self) -> None:
        for j in self.judges:
            j.clear()


