"""Judges: what forcing shows each comparison to, as the port runs (see capture.force.Judge).

A Collector compares and keeps only Metrics; a Keeper keeps what it is shown, as the truth
another judge compares against (the float64 noise floor).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from align.compare.metrics import (
    Metrics,
    combine,
    compare_arrays,
    missing,
    within_noise,
)
from align.compare.results import Tolerances


class Collector:
    """A Judge (see capture.force) that compares as it is shown tensors and keeps only Metrics,
    grouped by the reference call they count for.

    With a noise floor (`factor`), what fails the literal rule is judged again against the
    float64 truth, the reference's value for each (owner, label): at once if `truth` is given,
    else kept (a copy of the port's tensor, only for those) until `settle(truth)`, so that the
    truth is made only when something needs it. `strict`: the literal rule alone decides."""

    def __init__(self, tolerances: Tolerances, truth: Mapping[str, np.ndarray] | None = None,
                 factor: float | None = None, strict: bool = False):
        self.tolerances, self.truth, self.factor, self.strict = tolerances, truth, factor, strict
        self.found: dict[tuple[str, str], list[tuple[str, Metrics]]] = {}
        # (owner, direction, index in found, port copy, reference): failed literally, awaiting the truth
        self.deferred: list[tuple[str, str, int, np.ndarray, np.ndarray]] = []

    def compare(self, owner: str, direction: str, label: str, port: np.ndarray, ref: np.ndarray) -> None:
        tol = self.tolerances.for_name(owner)
        m = compare_arrays(port, ref, tol, label)
        items = self.found.setdefault((owner, direction), [])
        if self.factor is not None and not m.passed and not m.note:
            if self.truth is not None:
                m = within_noise(m, port, ref, self.truth.get(truth_key(owner, label)), tol, self.factor, self.strict)
            else:
                self.deferred.append((owner, direction, len(items), np.array(port), ref))
        items.append((label, m))

    def settle(self, truth: Mapping[str, np.ndarray]) -> None:
        """Judge what failed the literal rule against the float64 `truth`, now that it is made."""
        for owner, direction, i, port, ref in self.deferred:
            label, m = self.found[(owner, direction)][i]
            tol = self.tolerances.for_name(owner)
            self.found[(owner, direction)][i] = (label, within_noise(m, port, ref, truth.get(truth_key(owner, label)),
                                                                     tol, self.factor, self.strict))
        self.deferred, self.truth = [], truth

    def forget(self, owners: set[str]) -> None:
        """Drop what was seen for these owners (calls another pass judges)."""
        self.found = {k: v for k, v in self.found.items() if k[0] not in owners}
        self.deferred = [d for d in self.deferred if d[0] not in owners]

    def fail(self, owner: str, direction: str, label: str, note: str) -> None:
        self.found.setdefault((owner, direction), []).append((label, missing(note, label)))

    def clear(self) -> None:
        """Forget everything seen (the pass is being made again)."""
        self.found, self.deferred = {}, []

    def absorb(self, other: Collector) -> None:
        """Take over another collector's comparisons (a part judged in a pass of its own)."""
        for key, items in other.found.items():
            self.found.setdefault(key, []).extend(items)

    def get(self, owner: str, direction: str) -> Metrics | None:
        return combine([m for _, m in self.found.get((owner, direction), [])])

    def labelled(self, owner: str, direction: str, prefix: str) -> list[tuple[str, Metrics]]:
        """This owner's comparisons whose label starts with `prefix`, prefix removed."""
        return [(label[len(prefix):], m) for label, m in self.found.get((owner, direction), [])
                if label.startswith(prefix)]


class Keeper:
    """A Judge that keeps (a copy of) what it is shown, as the truth a Collector judges
    against: a judge is shown views that the model may still write to."""

    def __init__(self):
        self.kept: dict[str, np.ndarray] = {}

    def compare(self, owner: str, direction: str, label: str, port: np.ndarray, ref: np.ndarray) -> None:
        self.kept[truth_key(owner, label)] = np.array(port)

    def fail(self, owner: str, direction: str, label: str, note: str) -> None:
        pass

    def clear(self) -> None:
        self.kept = {}


def truth_key(owner: str, label: str) -> str:
    return f"{owner}|{label}"
