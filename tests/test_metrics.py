"""Metrics against numbers worked out by hand."""

import math

import numpy as np
import pytest

from align.compare.metrics import combine, compare_arrays, cosine, needed_atol, rel_diff
from align.registry.spec import Tolerance

TOL = Tolerance(atol=1e-5, rtol=1e-5)


def test_exact_match_passes_with_zero_error():
    a = np.array([1.0, -2.0, 3.0], dtype=np.float32)
    m = compare_arrays(a, a.copy(), TOL)
    assert m.passed and m.max_abs == 0.0 and m.max_rel == 0.0 and m.cosine == 1.0 and m.needed_atol == 0.0


def test_worked_example():
    ref = np.array([1.0, 2.0, 0.0, -4.0])
    port = np.array([1.0, 2.00004, 0.0, -4.0])
    m = compare_arrays(port, ref, TOL)
    # |d| = 4e-5 at index 1; allowed there: 1e-5 + 1e-5 * 2 = 3e-5.
    assert m.max_abs == pytest.approx(4e-5)
    assert m.mean_abs == pytest.approx(1e-5)
    assert m.max_rel == pytest.approx(2e-5)
    assert m.needed_atol == pytest.approx(4e-5 - 2e-5)
    assert not m.passed and m.mismatched == 1 and m.numel == 4
    assert m.worst == "[1]"


def test_rtol_term_scales_with_reference():
    ref = np.array([1000.0])
    assert compare_arrays(ref + 0.009, ref, TOL).passed  # allowed 1e-5 + 1e-2
    assert not compare_arrays(ref + 0.011, ref, TOL).passed


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_where_the_reference_is_finite_never_pass(bad):
    ref = np.array([1.0, 2.0])
    m = compare_arrays(np.array([1.0, bad]), ref, TOL)
    assert not m.passed and "NaN or Inf" in m.note


def test_nan_never_passes_even_where_the_reference_has_it_too():
    both = np.array([1.0, np.nan])
    assert not compare_arrays(both, both.copy(), TOL).passed
    assert not compare_arrays(np.array([1.0 + 1e-7, np.nan]), both, TOL).passed


def test_an_infinity_the_reference_has_at_the_same_place_is_equal():
    """An attention mask's -inf, built alike on both sides (whisper's decoder), is no error;
    the opposite sign, or an Inf against a finite value, is; the finite rest is judged."""
    mask = np.triu(np.full((3, 3), -np.inf, np.float32), 1)
    assert compare_arrays(mask, mask.copy(), TOL).passed  # bit-identical
    near = np.where(np.isinf(mask), mask, mask + np.float32(1e-7))
    m = compare_arrays(near, mask, TOL)
    assert m.passed and m.note == "3 infinities where the reference has the same" and m.needed_atol <= 1e-6
    assert not compare_arrays(np.where(np.isinf(mask), -mask, mask), mask, TOL).passed
    assert not compare_arrays(np.where(np.isinf(mask), mask, mask + np.float32(1e-3)), mask, TOL).passed


def test_shape_mismatch_and_empty_fail():
    assert "shape mismatch" in compare_arrays(np.zeros(3), np.zeros(4), TOL).note
    m = compare_arrays(np.zeros(0), np.zeros(0), TOL)
    assert not m.passed and "empty" in m.note


def test_relative_error_of_zero_reference():
    assert list(rel_diff(np.array([0.0, 1e-9]), np.array([0.0, 0.0]))) == [0.0, math.inf]


def test_cosine_by_hand():
    assert cosine(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == 0.0
    assert cosine(np.array([1.0, 1.0]), np.array([1.0, 0.0])) == pytest.approx(1 / math.sqrt(2))
    assert cosine(np.zeros(2), np.zeros(2)) == 1.0
    assert cosine(np.zeros(2), np.ones(2)) == 0.0


def test_needed_atol_is_the_passing_threshold():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=100)
    port = ref + rng.normal(size=100) * 1e-4
    need = needed_atol(port, ref, 1e-5)
    assert compare_arrays(port, ref, Tolerance(need, 1e-5)).passed
    assert not compare_arrays(port, ref, Tolerance(need * 0.99, 1e-5)).passed


def test_combine_takes_the_worst_and_none_for_nothing():
    good = compare_arrays(np.ones(2), np.ones(2), TOL, "out a")
    bad = compare_arrays(np.ones(2) * 2, np.ones(2), TOL, "out b")
    both = combine([good, bad])
    assert not both.passed and both.max_abs == 1.0 and both.worst.startswith("out b") and both.numel == 4
    assert combine([]) is None


def test_large_tensors_are_compared_in_slices_with_the_same_result(monkeypatch):
    """Slicing keeps the temporaries of a 2.4 GB gradient's comparison small; the verdict,
    the statistics and the index of the worst element must not change."""
    import align.compare.metrics as M
    from align.registry.spec import Tolerance

    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 1000, 3)).astype(np.float32)
    e = a + rng.standard_normal(a.shape).astype(np.float32) * 1e-5
    e[5, 7, 1] = 0.0
    whole = M.compare_arrays(a, e, Tolerance(1e-5, 1e-5), "g")
    monkeypatch.setattr(M, "CHUNK", 10_000)
    sliced = M.compare_arrays(a, e, Tolerance(1e-5, 1e-5), "g")
    assert sliced.worst == whole.worst == "g[5, 7, 1]"
    assert (sliced.passed, sliced.mismatched, sliced.numel) == (whole.passed, whole.mismatched, whole.numel)
    for field in ("max_abs", "mean_abs", "max_rel", "needed_atol", "cosine"):
        assert getattr(sliced, field) == pytest.approx(getattr(whole, field), rel=1e-9), field
    e[10, 0, 0] = np.nan  # a NaN in any slice fails the whole comparison, with its note
    assert "NaN or Inf" in M.compare_arrays(a, e, Tolerance(1e-5, 1e-5)).note


def test_float32_work_agrees_with_float64():
    """float32 tensors are compared in float32 (and the cosine from the difference's norm);
    every statistic must match the float64 computation on the same values."""
    rng = np.random.default_rng(1)
    e = rng.standard_normal((300, 500)).astype(np.float32)
    for scale in (1e-7, 1e-3, 1.0):  # nearly equal, close, unrelated-ish
        a = (e + scale * rng.standard_normal(e.shape)).astype(np.float32)
        a[0, :3], e[0, :3] = [0.0, 1e-3, 2.0], [0.0, 0.0, 2.0]  # 0/0 counts as equal, x/0 as inf
        f32, f64 = compare_arrays(a, e, TOL), compare_arrays(a.astype(np.float64), e.astype(np.float64), TOL)
        assert (f32.passed, f32.mismatched, f32.worst, f32.max_rel) == (f64.passed, f64.mismatched, f64.worst, f64.max_rel)
        for field in ("max_abs", "mean_abs", "needed_atol"):
            assert getattr(f32, field) == pytest.approx(getattr(f64, field), rel=1e-6), field
        truth = float(a.astype(np.float64).ravel() @ e.astype(np.float64).ravel()
                      / np.linalg.norm(a.astype(np.float64)) / np.linalg.norm(e.astype(np.float64)))
        assert abs(f32.cosine - truth) <= 1e-6 * max(1 - truth, 1e-7), (scale, f32.cosine, truth)


def test_a_difference_beyond_float32_range_is_still_measured():
    a = np.full(4, 3e38, np.float32)
    m = compare_arrays(a, -a, TOL)
    assert not m.passed and m.note == "" and m.max_abs == pytest.approx(6e38) and m.cosine == -1.0


def test_relative_l2_in_float32_agrees_with_float64():
    from align.compare.metrics import rel_l2

    rng = np.random.default_rng(2)
    e = rng.standard_normal((128, 64)).astype(np.float32)
    for scale in (1e-7, 1e-3, 1.0):
        a = (e + scale * rng.standard_normal(e.shape)).astype(np.float32)
        assert rel_l2(a, e) == pytest.approx(rel_l2(a.astype(np.float64), e.astype(np.float64)), rel=1e-5)
    assert rel_l2(np.full(3, 1e30, np.float32), np.full(3, 2e30, np.float32)) == pytest.approx(0.5)  # squares overflow
    assert rel_l2(np.array([np.nan], np.float32), np.ones(1, np.float32)) == math.inf


def test_work_buffers_are_reused_and_leave_no_trace_between_comparisons(monkeypatch):
    """Comparisons write their temporaries into reused buffers (fresh ones cost a page fault
    per 4 KiB). A comparison must give the same result whatever the one before it left in
    them: larger or smaller, float32 or float64, passing or failing."""
    import align.compare.metrics as M

    rng = np.random.default_rng(3)
    first = M.scratch(0, (300, 200), np.float32)
    assert np.shares_memory(first, M.scratch(0, (200, 300), np.float32))  # reused, in the shape asked for
    assert first.base is not None and not np.shares_memory(first, M.scratch(1, (300, 200), np.float32))

    pairs = []
    for shape, scale in (((400, 300), 1e-3), ((50, 400), 1e-7), ((7, 3), 1.0), ((500, 300), 1e-6), ((200, 100), 0.0)):
        e = rng.standard_normal(shape).astype(np.float32)
        pairs.append(((e + scale * rng.standard_normal(shape)).astype(np.float32), e))
    pairs.append((pairs[0][0].astype(np.float64), pairs[0][1].astype(np.float64)))
    pairs.append((np.full((300, 100), 3e38, np.float32), np.full((300, 100), -3e38, np.float32)))  # float64 fallback
    shared = [compare_arrays(a, e, TOL, "t") for a, e in pairs]
    monkeypatch.setattr(M, "SCRATCH_MIN", 1 << 62)  # every temporary fresh
    assert shared == [compare_arrays(a, e, TOL, "t") for a, e in pairs]
    assert [m.passed for m in shared] == [False, True, False, True, True, False, False]
