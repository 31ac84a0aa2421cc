"""Error metrics: small pure functions over float64 numpy arrays.

Convention (as torch.testing): `actual` is the port, `expected` is the reference, so every
relative error is relative to the reference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from align.spec import Tolerance


@dataclass(frozen=True)
class Metrics:
    """How one port tensor (or a group of them) differs from its reference."""

    max_abs: float
    mean_abs: float
    max_rel: float
    cosine: float
    passed: bool
    numel: int
    mismatched: int
    needed_atol: float  # the smallest atol that would have passed at the configured rtol
    worst: str  # which tensor and index holds the greatest absolute difference
    note: str = ""  # why it failed when the numbers alone do not say (NaN, shape, missing)

    def to_dict(self) -> dict:
        return asdict(self)


def abs_diff(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is NaN, by design
        return np.abs(actual.astype(np.float64) - expected.astype(np.float64))


def rel_diff(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """|a - e| / |e|; where e == 0 the result is 0 if a == 0 and inf otherwise."""
    diff = abs_diff(actual, expected)
    ref = np.abs(expected.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(ref > 0, diff / np.where(ref > 0, ref, 1.0), np.where(diff > 0, np.inf, 0.0))
    return rel


def cosine(actual: np.ndarray, expected: np.ndarray) -> float:
    """Cosine similarity of the flattened tensors; 1.0 when both are all zero."""
    a = actual.astype(np.float64).ravel()
    e = expected.astype(np.float64).ravel()
    na, ne = np.linalg.norm(a), np.linalg.norm(e)
    if na == 0 and ne == 0:
        return 1.0
    if na == 0 or ne == 0:
        return 0.0
    return float(np.clip(np.dot(a, e) / (na * ne), -1.0, 1.0))


def needed_atol(actual: np.ndarray, expected: np.ndarray, rtol: float) -> float:
    """The smallest atol for which every element satisfies |a - e| <= atol + rtol * |e|."""
    if actual.size == 0:
        return 0.0
    slack = abs_diff(actual, expected) - rtol * np.abs(expected.astype(np.float64))
    return float(max(slack.max(), 0.0))


def compare_arrays(actual: np.ndarray, expected: np.ndarray, tol: Tolerance, label: str = "") -> Metrics:
    """Compare one port tensor with its reference under an elementwise atol/rtol rule.

    Fails on shape mismatch, on an empty tensor, and on any NaN or Inf in either side.
    """
    if actual.shape != expected.shape:
        return _failed(f"shape mismatch: port {tuple(actual.shape)} vs reference {tuple(expected.shape)}", label)
    if expected.size == 0:
        return _failed("empty tensor: nothing to compare", label)
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    finite = np.isfinite(a) & np.isfinite(e)
    diff = np.where(finite, abs_diff(a, e), np.inf)
    allowed = tol.atol + tol.rtol * np.where(finite, np.abs(e), 0.0)
    ok = diff <= allowed
    mismatched = int(ok.size - ok.sum())
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
    nonfinite = int(finite.size - finite.sum())
    note = ""
    if nonfinite:
        note = f"{nonfinite} element(s) are NaN or Inf (port {int((~np.isfinite(a)).sum())}, reference {int((~np.isfinite(e)).sum())})"
    rel = rel_diff(a, e)
    return Metrics(
        max_abs=float(diff.max()),
        mean_abs=float(diff.mean()),
        max_rel=float(np.where(finite, rel, np.inf).max()),
        cosine=cosine(np.where(finite, a, 0.0), np.where(finite, e, 0.0)),
        passed=mismatched == 0,
        numel=int(ok.size),
        mismatched=mismatched,
        needed_atol=needed_atol(a, e, tol.rtol) if not nonfinite else float("inf"),
        worst=f"{label}{list(map(int, worst))}" if label else str(list(map(int, worst))),
        note=note,
    )


def missing(note: str, label: str = "") -> Metrics:
    """A failed comparison where one side has no tensor at all."""
    return _failed(note, label)


def _failed(note: str, label: str) -> Metrics:
    inf = float("inf")
    return Metrics(inf, inf, inf, 0.0, False, 0, 0, inf, label, note)


def combine(parts: list[Metrics]) -> Metrics | None:
    """One verdict over several tensors (a module's outputs): worst of each statistic.

    Returns None for no parts: the caller decides whether "nothing" is acceptable.
    """
    if not parts:
        return None
    numel = sum(p.numel for p in parts)
    worst = max(parts, key=lambda p: (not p.passed and p.numel == 0, p.max_abs))
    return Metrics(
        max_abs=max(p.max_abs for p in parts),
        mean_abs=sum(p.mean_abs * p.numel for p in parts) / numel if numel else float("inf"),
        max_rel=max(p.max_rel for p in parts),
        cosine=min(p.cosine for p in parts),
        passed=all(p.passed for p in parts),
        numel=numel,
        mismatched=sum(p.mismatched for p in parts),
        needed_atol=max(p.needed_atol for p in parts),
        worst=worst.worst,
        note="; ".join(p.note for p in parts if p.note),
    )


def within_noise(m: Metrics, actual: np.ndarray, expected: np.ndarray, truth: np.ndarray | None,
                 tol: Tolerance, factor: float) -> Metrics:
    """Re-judge a failed comparison against an fp64 `truth`: it passes if the port's error
    against the truth is at most `factor` times the fp32 reference's own (+ atol)."""
    if m.passed or truth is None or m.note or actual.shape != truth.shape:
        return m
    port_err = float(abs_diff(actual, truth).max())
    ref_err = float(abs_diff(expected, truth).max())
    if not np.isfinite(port_err) or port_err > factor * ref_err + tol.atol:
        return Metrics(**{**m.to_dict(), "note": f"port vs fp64 {port_err:.3g} > {factor:g} x the reference's "
                                                  f"own fp32 error {ref_err:.3g}"})
    return Metrics(**{**m.to_dict(), "passed": True,
                      "note": f"within fp32 noise: port vs fp64 {port_err:.3g} <= {factor:g} x reference's {ref_err:.3g}"})
