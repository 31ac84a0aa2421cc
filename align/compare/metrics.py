"""Error metrics: small pure functions over float64 numpy arrays.

Convention (as torch.testing): `actual` is the port, `expected` is the reference, so every
relative error is relative to the reference.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass

import numpy as np

from align.registry.spec import Tolerance


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
    # Which rule decided: "literal" (|port - ref| <= atol + rtol |ref|), "floor" (passed by the
    # float64 truth, see within_noise) or "strict" (judged literally; the truth's numbers kept).
    rule: str = "literal"
    truth_error: float | None = None  # RMS |port - ref_fp64|, where the truth was consulted
    reference_error: float | None = None  # RMS |ref_fp32 - ref_fp64|: the reference's own fp32 error

    def to_dict(self) -> dict:
        return asdict(self)


def abs_diff(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    wide = np.complex128 if np.iscomplexobj(actual) or np.iscomplexobj(expected) else np.float64
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is NaN, by design
        return np.abs(actual.astype(wide) - expected.astype(wide))


def rel_diff(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """|a - e| / |e|; where e == 0 the result is 0 if a == 0 and inf otherwise."""
    diff = abs_diff(actual, expected)
    ref = np.abs(expected.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(ref > 0, diff / np.where(ref > 0, ref, 1.0), np.where(diff > 0, np.inf, 0.0))
    return rel


def cosine(actual: np.ndarray, expected: np.ndarray) -> float:
    """Cosine similarity of the flattened tensors (float64 sums); 1.0 when both are all zero."""
    a, e = actual.ravel(), expected.ravel()
    na, ne = np.sqrt(_dot64(a, a)), np.sqrt(_dot64(e, e))
    if na == 0 and ne == 0:
        return 1.0
    if na == 0 or ne == 0:
        return 0.0
    return float(np.clip(_dot64(a, e) / (na * ne), -1.0, 1.0))


def _dot64(x: np.ndarray, y: np.ndarray) -> float:
    # einsum with a float64 accumulator: float64 sums without float64 copies, and (unlike
    # np.dot on float64, which goes through BLAS) fast on these 2-core machines.
    return float(np.einsum("i,i->", x, y, dtype=np.float64))


def needed_atol(actual: np.ndarray, expected: np.ndarray, rtol: float) -> float:
    """The smallest atol for which every element satisfies |a - e| <= atol + rtol * |e|."""
    if actual.size == 0:
        return 0.0
    slack = abs_diff(actual, expected) - rtol * np.abs(expected.astype(np.float64))
    return float(max(slack.max(), 0.0))


def compare_arrays(actual: np.ndarray, expected: np.ndarray, tol: Tolerance, label: str = "") -> Metrics:
    """Compare one port tensor with its reference under an elementwise atol/rtol rule.

    Fails on shape mismatch, on an empty tensor, on any NaN in either side, and on an Inf
    that the reference does not have at the same place with the same sign (an attention
    mask's -inf, built the same on both sides, is equal; an overflow is not).
    Elementwise work is done in the tensors' own precision when both are float32 (as
    torch.isclose does), the reductions that need it (cosine) in float64: comparing is on
    the hot path of every run, and fresh float64 temporaries cost more than the arithmetic.
    """
    if actual.shape != expected.shape:
        return _failed(f"shape mismatch: port {tuple(actual.shape)} vs reference {tuple(expected.shape)}", label)
    if expected.size == 0:
        return _failed("empty tensor: nothing to compare", label)
    if expected.ndim == 0:  # a loss: ufuncs would hand back scalars, which cannot be written into
        m = compare_arrays(actual.reshape(1), expected.reshape(1), tol, label)
        return Metrics(**{**m.to_dict(), "worst": f"{label}[]" if label else "[]"})
    kinds = actual.dtype.kind + expected.dtype.kind
    if any(k in "iub" for k in kinds) or any(k == "c" for k in kinds):
        if len({k in "iub" for k in kinds}) > 1 or len({k == "c" for k in kinds}) > 1:
            return _failed(f"dtype mismatch: port {actual.dtype} vs reference {expected.dtype}", label)
        return _compare_exact(actual, expected, label) if kinds[0] in "iub" else _compare_complex(actual, expected, tol, label)
    if actual.dtype == expected.dtype and _equal(actual, expected) \
            and not np.isnan(expected).any():
        return _identical(expected, label)  # common under teacher forcing, and cheap to see
    if expected.size > CHUNK:
        return _compare_chunked(actual, expected, tol, label)
    work = np.float32 if actual.dtype == expected.dtype == np.float32 else np.float64
    diff, ref_abs, slack = (scratch(i, expected.shape, work) for i in range(3))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # inf - inf, x/0: handled below
        np.subtract(actual, expected, out=diff, dtype=work)
        np.abs(diff, out=diff)
        worst_flat = int(np.argmax(diff))  # argmax stops at the first NaN, and a NaN or Inf anywhere
        if not math.isfinite(diff.flat[worst_flat]):  # on either side makes the difference non-finite
            if work is np.float32 and np.isfinite(actual).all() and np.isfinite(expected).all():
                # finite values whose difference exceeds float32's range: in float64
                return compare_arrays(actual.astype(np.float64), expected.astype(np.float64), tol, label)
            return _compare_nonfinite(actual, expected, tol, label)
        np.abs(expected, out=ref_abs, dtype=work)
        np.multiply(ref_abs, tol.rtol, out=slack, dtype=work)
        np.subtract(diff, slack, out=slack)  # > atol exactly where |a - e| > atol + rtol * |e|
        needed = float(slack.max())
        mismatched = int(np.count_nonzero(slack > tol.atol)) if needed > tol.atol else 0
        rel = np.divide(diff, ref_abs, out=slack)  # x/0 is inf, 0/0 NaN (fmax skips it: equal zeros)
        max_rel = float(np.fmax.reduce(rel, axis=None))
        total = float(np.add.reduce(diff, axis=None))
        if not np.isfinite(total):  # float32's range exceeded: the float64 sum
            total = float(np.add.reduce(diff, axis=None, dtype=np.float64))
    worst = np.unravel_index(worst_flat, diff.shape)
    return Metrics(
        max_abs=float(diff.flat[worst_flat]),
        mean_abs=total / diff.size,
        max_rel=0.0 if math.isnan(max_rel) else max_rel,
        cosine=_cosine_near(actual, expected, diff),
        passed=mismatched == 0,
        numel=int(diff.size),
        mismatched=mismatched,
        needed_atol=max(needed, 0.0),
        worst=f"{label}{list(map(int, worst))}" if label else str(list(map(int, worst))),
    )


class _Scratch(threading.local):
    buffers: dict[tuple[int, np.dtype], np.ndarray]

    def __init__(self) -> None:
        self.buffers = {}


_SCRATCH = _Scratch()
SCRATCH_MIN = 1 << 14  # below this (64 KiB of float32) malloc keeps the memory: a fresh array is cheaper


def scratch(slot: int, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """Work buffer number `slot`, in this shape; its contents are garbage, and the next call
    for the same slot (in this thread) reuses its memory. A fresh temporary the size of a
    tensor costs a page fault per 4 KiB (glibc hands large blocks back to the OS when they
    are freed), which made comparing five times slower than the arithmetic in it."""
    n = math.prod(shape)
    if n < SCRATCH_MIN:
        return np.empty(shape, dtype)
    key = (slot, np.dtype(dtype))
    buf = _SCRATCH.buffers.get(key)
    if buf is None or buf.size < n:
        buf = _SCRATCH.buffers[key] = np.empty(n, dtype)
    return buf[:n].reshape(shape)


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    """The very same elements: one buffer, read the same way (a value handed on unchanged)."""
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.strides == b.strides and a.shape == b.shape)


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    """array_equal, after a look at three elements: rounding differences touch most
    elements, so a differing pair is usually known without reading either tensor (or
    asking where they live, which costs more than the look)."""
    n = a.size
    for i in (0, n // 2, n - 1):
        if a.flat[i] != b.flat[i]:
            return False
    return _same_memory(a, b) or bool(np.array_equal(a, b))


def sum_squares(x: np.ndarray) -> float:
    """The sum of x's squares, in x's precision (BLAS for contiguous x), without copying x."""
    if x.flags.c_contiguous:
        flat = x.reshape(-1)
        return float(np.dot(flat, flat))
    axes = list(range(x.ndim))
    return float(np.einsum(x, axes, x, axes, []))  # without the copy reshape would make


def _cosine_near(actual: np.ndarray, expected: np.ndarray, diff: np.ndarray) -> float:
    """cosine(actual, expected), from the norms and the difference's norm:
    1 - cos = (|a - e|^2 - (|a| - |e|)^2) / (2 |a| |e|). For nearly equal tensors the
    numerator comes from the small difference itself, so float32 sums keep it exact to far
    below 1e-7, where a float32 dot product would have rounded the cosine to 1."""
    if actual.dtype != np.float32 or expected.dtype != np.float32:
        return cosine(actual, expected)
    with np.errstate(over="ignore", invalid="ignore"):
        sa, se, sd = sum_squares(actual), sum_squares(expected), sum_squares(diff)
    if not math.isfinite(sa + se + sd):  # squares beyond float32's range
        return cosine(actual, expected)
    # Python floats from here: numpy's scalar functions cost more than this whole formula.
    na, ne = math.sqrt(sa), math.sqrt(se)
    if na == 0 and ne == 0:
        return 1.0
    if na == 0 or ne == 0:
        return 0.0
    return min(1.0, max(-1.0, 1.0 - (sd - (na - ne) ** 2) / (2.0 * na * ne)))


# Above this many elements a comparison runs in slices, so that its temporaries stay small
# next to the tensors themselves (a 256k-vocab embedding gradient is 2.4 GB).
CHUNK = 1 << 22


def _compare_chunked(actual: np.ndarray, expected: np.ndarray, tol: Tolerance, label: str) -> Metrics:
    a, e = actual.reshape(-1), expected.reshape(-1)
    parts, dots = [], np.zeros(3)
    for start in range(0, e.size, CHUNK):
        pa, pe = a[start:start + CHUNK], e[start:start + CHUNK]
        m = compare_arrays(pa, pe, tol)
        if m.note:  # NaN or Inf somewhere: the careful whole-tensor account
            return _compare_nonfinite(actual, expected, tol, label)
        parts.append((start, m))
        dots += (_dot64(pa, pe), _dot64(pa, pa), _dot64(pe, pe))
    start, worst = max(parts, key=lambda p: p[1].max_abs)
    index = np.unravel_index(start + int(worst.worst.strip("[]")), expected.shape)
    na, ne = np.sqrt(dots[1]), np.sqrt(dots[2])
    cos = 1.0 if na == ne == 0 else 0.0 if na == 0 or ne == 0 else float(np.clip(dots[0] / (na * ne), -1.0, 1.0))
    return Metrics(
        max_abs=worst.max_abs,
        mean_abs=sum(m.mean_abs * m.numel for _, m in parts) / e.size,
        max_rel=max(m.max_rel for _, m in parts),
        cosine=cos,
        passed=all(m.passed for _, m in parts),
        numel=int(e.size),
        mismatched=sum(m.mismatched for _, m in parts),
        needed_atol=max(m.needed_atol for _, m in parts),
        worst=f"{label}{list(map(int, index))}" if label else str(list(map(int, index))),
    )


def _at(label: str, index: tuple) -> str:
    return f"{label}{list(map(int, index))}" if label else str(list(map(int, index)))


def _compare_exact(actual: np.ndarray, expected: np.ndarray, label: str) -> Metrics:
    """Integers and booleans (codes, indices, masks) must be equal: no tolerance applies."""
    a, e = actual.astype(np.int64), expected.astype(np.int64)
    wrong = a != e
    diff = np.abs(a - e).astype(np.float64)
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
    mismatched = int(np.count_nonzero(wrong))
    ref = np.abs(e).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(ref > 0, diff / np.where(ref > 0, ref, 1.0), np.where(diff > 0, np.inf, 0.0))
    return Metrics(
        max_abs=float(diff.max()), mean_abs=float(diff.mean()), max_rel=float(rel.max()),
        cosine=cosine(a.astype(np.float64), e.astype(np.float64)), passed=mismatched == 0, numel=int(e.size),
        mismatched=mismatched, needed_atol=0.0 if mismatched == 0 else float("inf"), worst=_at(label, worst),
        note="" if mismatched == 0 else f"integers compare exactly: {mismatched} of {e.size} differ",
    )


def _compare_complex(actual: np.ndarray, expected: np.ndarray, tol: Tolerance, label: str) -> Metrics:
    """Complex tensors as complex: |a - e| <= atol + rtol * |e|, with |.| the modulus."""
    a, e = actual.astype(np.complex128), expected.astype(np.complex128)
    if not (np.isfinite(a).all() and np.isfinite(e).all()):
        bad = int((~np.isfinite(a)).sum() + (~np.isfinite(e)).sum())
        inf = float("inf")
        return Metrics(inf, inf, inf, 0.0, False, int(e.size), int(e.size), inf, label,
                       f"{bad} element(s) are NaN or Inf (complex)")
    diff, ref = np.abs(a - e), np.abs(e)
    slack = diff - tol.rtol * ref
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
    mismatched = int(np.count_nonzero(slack > tol.atol))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(ref > 0, diff / np.where(ref > 0, ref, 1.0), np.where(diff > 0, np.inf, 0.0))
    na, ne = float(np.linalg.norm(a)), float(np.linalg.norm(e))
    cos = 1.0 if na == ne == 0 else 0.0 if na == 0 or ne == 0 else float(np.clip(np.vdot(e, a).real / (na * ne), -1, 1))
    return Metrics(max_abs=float(diff.max()), mean_abs=float(diff.mean()), max_rel=float(rel.max()), cosine=cos,
                   passed=mismatched == 0, numel=int(e.size), mismatched=mismatched,
                   needed_atol=max(float(slack.max()), 0.0), worst=_at(label, worst))


def _identical(expected: np.ndarray, label: str) -> Metrics:
    first = [0] * expected.ndim
    return Metrics(max_abs=0.0, mean_abs=0.0, max_rel=0.0, cosine=1.0, passed=True, numel=int(expected.size),
                   mismatched=0, needed_atol=0.0, worst=f"{label}{first}" if label else str(first))


def _compare_nonfinite(actual: np.ndarray, expected: np.ndarray, tol: Tolerance, label: str) -> Metrics:
    """The slow, careful path for tensors holding NaN or Inf. A NaN never passes, nor does
    an Inf but where the reference has the same Inf; the finite rest is judged as usual."""
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    finite = np.isfinite(a) & np.isfinite(e)
    same_inf = np.isinf(e) & (a == e)
    with np.errstate(invalid="ignore"):
        diff = np.where(finite, abs_diff(a, e), np.where(same_inf, 0.0, np.inf))
    slack = diff - tol.rtol * np.where(finite, np.abs(e), 0.0)
    ok = slack <= tol.atol
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
    unmatched = int(diff.size - finite.sum() - same_inf.sum())
    passed = bool(ok.all())
    note = (f"{int(same_inf.sum())} infinities where the reference has the same" if passed else
            f"{unmatched} element(s) are NaN or Inf where the reference has no such value "
            f"(port {int((~np.isfinite(a)).sum())}, reference {int((~np.isfinite(e)).sum())} not finite)")
    return Metrics(
        max_abs=float(diff.max()),
        mean_abs=float(diff.mean()),
        max_rel=float(np.where(finite, rel_diff(a, e), np.where(same_inf, 0.0, np.inf)).max()),
        cosine=cosine(np.where(finite, a, 0.0), np.where(finite, e, 0.0)),
        passed=passed,
        numel=int(ok.size),
        mismatched=int(ok.size - ok.sum()),
        needed_atol=float(max(slack.max(), 0.0)) if passed else float("inf"),
        worst=f"{label}{list(map(int, worst))}" if label else str(list(map(int, worst))),
        note=note,
    )


def missing(note: str, label: str = "") -> Metrics:
    """A failed comparison where one side has no tensor at all."""
    return _failed(note, label)


def not_compared(note: str) -> Metrics:
    """Nothing to compare, and rightly so (a child the port need not call): passes, says why."""
    return Metrics(0.0, 0.0, 0.0, 1.0, True, 0, 0, 0.0, "", note)


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
        rule="strict" if any(p.rule == "strict" for p in parts) else
             "floor" if any(p.rule == "floor" for p in parts) else "literal",
        truth_error=max((p.truth_error for p in parts if p.truth_error is not None), default=None),
        reference_error=max((p.reference_error for p in parts if p.reference_error is not None), default=None),
    )


FP32_EPS = float(np.finfo(np.float32).eps)
MAX_SPREAD = 4.0  # how much further the worst element may stray than the RMS rule's factor
FP32_MAX = float(np.finfo(np.float32).max)


def _meaningful(truth: np.ndarray) -> np.ndarray:
    """Where the float64 truth can judge an fp32 value: finite, and within fp32's range. A mask's
    "minus infinity" is finfo(float64).min there and finfo(float32).min in fp32: both sides are
    as far from it, which would let any mask pass."""
    return np.isfinite(truth) & (np.abs(truth) <= FP32_MAX)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def floor_errors(actual: np.ndarray, expected: np.ndarray, truth: np.ndarray) -> dict[str, float] | None:
    """The port's and the fp32 reference's errors against the float64 truth, over the elements
    where the truth can judge (see _meaningful; transformers' fully masked attention rows are
    not finite in float64) and both values are finite: RMS and max of each, and the RMS and max
    magnitude of the truth. None when no element is left."""
    wide = np.complex128 if np.iscomplexobj(truth) or np.iscomplexobj(actual) else np.float64
    a, e, t = actual.astype(wide), expected.astype(wide), truth.astype(wide)
    ok = np.isfinite(a) & np.isfinite(e) & _meaningful(t)
    if not ok.any():
        return None
    pe, re, tm = np.abs(a[ok] - t[ok]), np.abs(e[ok] - t[ok]), np.abs(t[ok])
    rms = _rms
    return {"port_rms": rms(pe), "ref_rms": rms(re), "port_max": float(pe.max()), "ref_max": float(re.max()),
            "truth_rms": rms(tm), "truth_max": float(tm.max()), "excluded": int(ok.size - ok.sum())}


def within_noise(m: Metrics, actual: np.ndarray, expected: np.ndarray, truth: np.ndarray | None,
                 tol: Tolerance, factor: float, strict: bool = False) -> Metrics:
    """Re-judge a comparison that fails the literal tolerance against the float64 `truth` (the
    reference run again in float64): it passes when the port is no further from the truth than
    `factor` times the fp32 reference's own error against it, in RMS (plus one fp32 ulp of the
    truth's RMS, for a reference that is exact), and its worst element no further than
    MAX_SPREAD times that again (so a few large errors cannot hide in a large tensor's RMS).
    Elements where the truth is not finite are judged by the literal rule alone, so any that
    fails there still fails. With `strict`, the numbers are kept but the literal rule decides."""
    if m.passed or truth is None or m.note or actual.shape != truth.shape:
        return m
    errors = floor_errors(actual, expected, truth)
    if errors is None:
        return Metrics(**{**m.to_dict(), "note": "the float64 truth is not finite here: judged literally"})
    port, ref = errors["port_rms"], errors["ref_rms"]
    numbers = {"truth_error": port, "reference_error": ref}
    if strict:
        return Metrics(**{**m.to_dict(), **numbers, "rule": "strict",
                          "note": f"strict: the literal tolerance alone judges; the reference's own fp32 error "
                                  f"against float64 is {ref:.3g} RMS ({errors['ref_max']:.3g} max), the port's {port:.3g}"})
    allowed = factor * ref + FP32_EPS * errors["truth_rms"]
    allowed_max = MAX_SPREAD * factor * errors["ref_max"] + FP32_EPS * errors["truth_max"]
    literal_elsewhere = errors["excluded"] == 0 or _close_where_untrue(actual, expected, truth, tol, allowed_max)
    if port <= allowed and errors["port_max"] <= allowed_max and literal_elsewhere:
        return Metrics(**{**m.to_dict(), **numbers, "passed": True, "rule": "floor",
                          "note": f"within fp32 noise: port vs fp64 {port:.3g} RMS <= {factor:g} x the reference's "
                                  f"own {ref:.3g} (max {errors['port_max']:.3g} vs {errors['ref_max']:.3g})"})
    why = (f"port vs fp64 {port:.3g} RMS > {factor:g} x the reference's own fp32 error {ref:.3g}" if port > allowed
           else f"its worst element is {errors['port_max']:.3g} from fp64, > {MAX_SPREAD * factor:g} x the "
                f"reference's worst {errors['ref_max']:.3g}" if errors["port_max"] > allowed_max
           else f"where the float64 truth cannot judge (not finite, or a mask's minus infinity) it is further from "
                f"the reference than the literal tolerance and than {allowed_max:.3g}, the worst error allowed where it can")
    return Metrics(**{**m.to_dict(), **numbers, "note": why})


def _close_where_untrue(actual: np.ndarray, expected: np.ndarray, truth: np.ndarray, tol: Tolerance,
                        allowed_max: float) -> bool:
    """Whether every element the truth cannot judge is as close to the fp32 reference as the
    literal rule asks, or as the worst element the truth judged may be (`allowed_max`, from the
    reference's own error on the rest of the tensor). transformers computes attention's softmax in
    float32 even in a float64 model, so a fully masked row (a padded query) is NaN in the truth
    while both fp32 sides compute it alike, with the same rounding as every other row."""
    bad = ~_meaningful(truth.astype(np.complex128 if np.iscomplexobj(truth) else np.float64))
    a, e = actual[bad], expected[bad]
    diff = abs_diff(a, e)
    return bool(np.all((diff <= tol.atol + tol.rtol * np.abs(e.astype(np.float64))) | (diff <= allowed_max)))


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    """||actual - expected|| / ||expected||; inf for a non-finite or shape-mismatched pair.

    float32 pairs are measured in float32 (the difference of close values is exact, and
    the ratio feeds a factor-of-10 test); float64 only when that over- or underflows."""
    if actual.shape != expected.shape:
        return float("inf")
    if actual.dtype == expected.dtype == np.float32 and actual.size:
        with np.errstate(over="ignore", invalid="ignore"):
            d = np.subtract(actual, expected, out=scratch(0, expected.shape, np.float32))
            num, den = sum_squares(d), sum_squares(expected)
        if np.isfinite(num) and np.isfinite(den) and den > 1e-30:
            return float(np.sqrt(num / den))
    wide = np.complex128 if np.iscomplexobj(actual) or np.iscomplexobj(expected) else np.float64
    a, e = actual.astype(wide), expected.astype(wide)
    if not (np.isfinite(a).all() and np.isfinite(e).all()):
        return float("inf")
    num, den = float(np.linalg.norm(a - e)), float(np.linalg.norm(e))
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))
