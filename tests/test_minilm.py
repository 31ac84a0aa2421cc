"""BertModel with the REAL all-MiniLM-L6-v2 weights, on real sentences, judged by the fp64
noise floor; and proof that the noise floor hides no bug."""

import numpy as np
import paddle
import pytest
from conftest import after_init

from align.compare.metrics import compare_arrays, within_noise
from align.registry.spec import Tolerance
from ports.text import bert as B

TOL = Tolerance(1e-5, 1e-5)


def test_noise_floor_rule_by_hand():
    truth = np.array([100.0, 200.0, 300.0, 400.0])
    ref = truth + np.array([1e-3, -2e-3, 1e-3, -2e-3])  # the reference's own fp32 error: RMS 1.58e-3, max 2e-3
    close = truth + np.array([-3e-3, 1e-3, -3e-3, 1e-3])  # RMS 2.24e-3 <= 2 x 1.58e-3, max 3e-3 <= 8 x 2e-3
    far = truth + np.array([5e-3, 4e-3, 5e-3, 4e-3])  # RMS 4.53e-3 > 2 x 1.58e-3 + 1 ulp
    m = compare_arrays(close, ref, TOL)
    assert not m.passed
    rescued = within_noise(m, close, ref, truth, TOL, factor=2.0)
    assert rescued.passed and rescued.rule == "floor"
    assert rescued.note.startswith("within fp32 noise: port vs fp64 0.00224 RMS <= 2 x the reference's own 0.00158")
    assert rescued.truth_error == pytest.approx(np.sqrt(5e-6)) and rescued.reference_error == pytest.approx(np.sqrt(2.5e-6))
    judged = within_noise(compare_arrays(far, ref, TOL), far, ref, truth, TOL, factor=2.0)
    assert not judged.passed and "> 2 x the reference's own fp32 error" in judged.note
    # One element far off cannot hide in a large tensor's RMS: the worst element is held to 4 x
    # the factor times the reference's worst. 1000 elements, all 1e-3 off but one, 2e-2 off:
    # RMS 1.18e-3 <= 2 x 1e-3, but 2e-2 > 8 x 1e-3.
    big = np.linspace(100.0, 200.0, 1000)
    signs = np.where(np.arange(1000) % 2, 1.0, -1.0)
    spike = big + 1e-3 * signs
    spike[500] = big[500] + 2e-2
    judged = within_noise(compare_arrays(spike, big + 1e-3 * signs[::-1], TOL), spike, big + 1e-3 * signs[::-1],
                          big, TOL, factor=2.0)
    assert not judged.passed and judged.note.startswith("its worst element is 0.02 from fp64, > 8 x the reference's")
    # Strict: the numbers are kept, the literal rule decides.
    strict = within_noise(m, close, ref, truth, TOL, factor=2.0, strict=True)
    assert not strict.passed and strict.rule == "strict" and strict.reference_error == rescued.reference_error
    nan = np.array([np.nan, 200.0, 300.0, 400.0])
    assert not within_noise(compare_arrays(nan, ref, TOL), nan, ref, truth, TOL, 2.0).passed  # NaN never passes
    # Where the truth cannot judge (a mask's minus infinity, float64's own), the literal rule does.
    mask_truth, mask_ref = np.array([np.finfo(np.float64).min, 1.0]), np.array([np.finfo(np.float32).min, 1.0])
    wrong_mask = np.array([0.0, 1.0 + 1e-3])
    assert not within_noise(compare_arrays(wrong_mask, mask_ref, TOL), wrong_mask, mask_ref, mask_truth, TOL, 2.0).passed


def test_real_checkpoint_aligns(run_cli, bug_ledger):
    code, report, _ = run_cli("run", "minilm")
    bug_ledger.record_clean("minilm (real weights)", false_alarm=report["verdict"] != "pass")
    assert code == 0 and report["verdict"] == "pass", report["culprits"]
    assert report["config"] == "real" and report["checkpoint"].endswith("model.safetensors")
    outputs = {o["name"]: o for o in report["outputs"]}
    assert set(outputs) == {"last_hidden_state", "pooler_output", "mean_pooled (derived)"}
    assert all(o["passed"] for o in outputs.values())
    assert outputs["mean_pooled (derived)"]["cosine"] > 0.999999
    tf = next(r for r in report["runs"] if r["mode"] == "teacher_forced" and r["status"] == "ran")
    assert "ref_fp64" in tf["tolerance"]["policy"]
    assert all(layer["forward"]["passed"] and not layer["forward"]["note"] for layer in tf["layers"])
    rescued = [p for p in report["param_grads"] if p["note"].startswith("within fp32 noise")]
    assert rescued, "with real weights some gradients exceed 1e-5 by fp32 rounding alone"
    assert len(report["weights"]) == 103 and all(w["exact"] for w in report["weights"])


def tanh_gelu(mp):
    after_init(mp, B.BertIntermediate, lambda self, *a: setattr(self, "intermediate_act_fn", paddle.nn.GELU(approximate=True)))


def attention_scale_missing(mp):
    after_init(mp, B.BertSelfAttention, lambda self, *a: setattr(self, "scaling", 1.0))


@pytest.mark.parametrize("inject,culprit", [
    (tanh_gelu, "encoder.layer.0.intermediate.intermediate_act_fn"),
    (attention_scale_missing, "encoder.layer.0.attention.self"),
])
def test_noise_floor_hides_no_bug(inject, culprit, monkeypatch, run_cli, bug_ledger):
    inject(monkeypatch)
    code, report, _ = run_cli("run", "minilm", "--dtype", "fp32")
    detected = code == 1
    localized = report["first_divergence"]["forward"] == culprit
    bug_ledger.record(f"minilm:{inject.__name__}", "real weights", detected, localized)
    assert detected and localized, report["culprits"]
