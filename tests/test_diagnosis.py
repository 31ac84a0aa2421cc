"""Localization, amplification, the observer check, the environment record, and the repro."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REGISTRY
from conftest import ROOT as PROJECT

from align.capture.trace import ROOT
from align.compare.metrics import compare_arrays
from align.compare.results import LayerResult
from align.diagnose.culprits import amplification, culprits, deepest
from align.registry.load import load_registry
from align.registry.spec import Tolerance

TOL = Tolerance(1e-5, 1e-5)
GOOD = compare_arrays(np.ones(2), np.ones(2), TOL)
BAD = compare_arrays(np.ones(2) * 2, np.ones(2), TOL)


def layer(name, fwd=GOOD, bwd=None):
    return LayerResult(name, name, "T", fwd, bwd, TOL, module=name.split("#")[0])


def test_culprit_is_the_deepest_failing_module():
    layers = (layer("a.b.c"), layer("a.b", BAD), layer("a", BAD), layer(ROOT, BAD), layer("x", GOOD, BAD))
    order = ["a.b.c", "a.b", "a", "x", ROOT]
    c = culprits(layers, order, order[::-1])
    assert c.forward == ("a.b",)  # a and the root fail only because a.b does
    assert c.backward == ("x",)


def test_siblings_are_separate_culprits_and_repeated_calls_count():
    layers = (layer("m.l0.attn", BAD), layer("m.l1.attn", BAD), layer("m.l0", BAD), layer("m.f#2", BAD))
    c = culprits(layers, ["m.l0.attn", "m.l0", "m.l1.attn", "m.f#2"], [])
    assert c.forward == ("m.l0.attn", "m.l1.attn", "m.f#2")


def test_nothing_failing_means_no_culprit():
    assert culprits((layer("a"), layer(ROOT)), ["a", ROOT], [ROOT, "a"]).forward == ()
    assert deepest([]) == ()


def test_amplification_separates_a_local_bug_from_drift():
    x = np.linspace(1, 2, 10)
    drifted = x * (1 + 1e-3)
    # Error in, same error out: drift, not flagged.
    assert not amplification({"h": drifted}, {"h": x}, {"o": drifted}, {"o": x}).flagged
    # Exact in, wrong out: a local bug.
    local = amplification({"h": x}, {"h": x}, {"o": x * 1.01}, {"o": x})
    assert local.flagged and local.input_error == 0 and local.ratio == float("inf")
    # fp32 rounding from an exact input stays under the floor.
    assert not amplification({"h": x}, {"h": x}, {"o": x * (1 + 1e-7)}, {"o": x}).flagged
    # Small error in, 100x out.
    amp = amplification({"h": x * (1 + 1e-5)}, {"h": x}, {"o": x * (1 + 1e-3)}, {"o": x})
    assert amp.flagged and amp.ratio == pytest.approx(100, rel=1e-3)


def test_a_record_written_to_later_is_recorded_again_with_copies():
    """Records share the reference's tensors; a model that writes in place to a tensor after
    it was recorded must not change what was recorded (torch's version counter shows it)."""
    import torch

    from align.capture.hooks import run_and_record
    from align.capture.torch_side import TorchSide

    class Writer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x):
            h = self.lin(x)
            before = h.detach().clone()
            h.mul_(2)  # in place, after the child's output was recorded
            return h.sum() + before.sum() * 0

    torch.manual_seed(0)
    model, x = Writer(), torch.randn(2, 3)
    expected = model.lin(x).detach().numpy().copy()
    trace = run_and_record(TorchSide(), model, {"x": x}, lambda out: out, keep_inputs=True)
    assert np.array_equal(trace.calls["lin"].outputs["out"].data, expected)
    assert np.array_equal(trace.param_grads["lin.bias"], np.full(3, 4.0, np.float32))  # d(sum(2h))/db = 2 * 2 rows

    class Reader(Writer):  # the same model without the write: its records stay shared
        def forward(self, x):
            return (self.lin(x) * 2).sum()

    reader = Reader()
    reader.load_state_dict(model.state_dict())
    shared = run_and_record(TorchSide(), reader, {"x": x}, lambda out: out, keep_inputs=True)
    assert np.array_equal(shared.calls["lin"].outputs["out"].data, expected)
    assert not shared.calls["lin"].outputs["out"].data.flags.owndata


def test_a_recorder_is_freed_by_reference_counting():
    """The gradient hooks must not hold their Recorder: its snapshot cache holds the hooked
    tensors, whose graphs hold the weights. A cycle there keeps a whole model alive until
    the garbage collector happens to run (one block per block, when layers are streamed)."""
    import gc
    import weakref

    import torch

    from align.capture.hooks import Recorder, hooked
    from align.capture.torch_side import TorchSide

    model, x = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh()), torch.randn(2, 3)
    gc.disable()
    try:
        for share in (False, True):
            recorder = Recorder(TorchSide(), keep_inputs=True, share=share)
            with hooked(TorchSide(), model, recorder):
                model(x).sum().backward()
            alive = weakref.ref(recorder)
            del recorder
            assert alive() is None, f"share={share}: the Recorder outlived its last reference"
    finally:
        gc.enable()


@pytest.mark.parametrize("room", [True, False], ids=["alongside", "after"])
def test_observer_effect_is_caught(monkeypatch, run_cli, room):
    """Instrumentation that perturbs what it records must not go unnoticed, whether the
    port's run without hooks goes alongside the instrumented ones or after them."""
    from align.capture.paddle_side import PaddleSide, paddle
    from align.diagnose import observer as diagnose

    monkeypatch.setattr(diagnose, "room_alongside", lambda nbytes: room)
    monkeypatch.setattr(PaddleSide, "identity", lambda self, t: t * paddle.to_tensor(1.0 + 1e-6, dtype=t.dtype))
    _, report, err = run_cli("run", "gemma2", "--dtype", "fp32")
    by_fw = {o["framework"]: o for o in report["observer"]}
    assert not by_fw["torch"]["perturbed"] and not by_fw["torch"]["alongside"]
    assert by_fw["paddle"]["alongside"] is room
    assert not by_fw["paddle"]["outputs_identical"] and by_fw["paddle"]["perturbed"]
    assert any(w.startswith("observer effect: the paddle model") for w in report["warnings"])
    assert "observer check (paddle): outputs and grads with hooks vs without: DIFFERENT" in err
    assert ("on a copy, alongside the others" in err) is room


def test_observer_effect_on_the_reference_is_caught(monkeypatch, run_cli):
    """The reference's run without hooks goes before its hooked run (so that the hooked run
    reuses its memory); a hook that perturbs what it records must still show."""
    from align.capture.torch_side import TorchSide

    monkeypatch.setattr(TorchSide, "identity", lambda self, t: t * (1.0 + 1e-6))
    _, report, err = run_cli("run", "gemma2", "--dtype", "fp32")
    by_fw = {o["framework"]: o for o in report["observer"]}
    assert by_fw["torch"]["checked"] and by_fw["torch"]["perturbed"] and not by_fw["torch"]["outputs_identical"]
    assert any(w.startswith("observer effect: the torch model") for w in report["warnings"])
    assert "observer check (torch): outputs and grads with hooks vs without: DIFFERENT" in err


@pytest.mark.parametrize("broken", [False, True])
def test_the_observer_run_alongside_judges_as_the_one_after(monkeypatch, broken):
    """The port's run without hooks, made on a copy in a thread of its own while the forced
    and free-running runs go on, gives the very report the run made after them gives."""
    from test_injected_bugs import attention_without_softcap

    from align.core.port import align_model
    from align.diagnose import observer as diagnose

    if broken:
        attention_without_softcap(monkeypatch)
    spec = load_registry(REGISTRY).get("gemma2")
    reports = {}
    for room in (True, False):
        monkeypatch.setattr(diagnose, "room_alongside", lambda nbytes, room=room: room)
        reports[room] = align_model(spec, dtypes=("float32",)).to_dict()
    for room, report in reports.items():
        report.pop("created")
        paddle_observer = report["observer"][1]
        assert paddle_observer.pop("alongside") is room and paddle_observer["state"] == "identical"
    assert reports[True] == reports[False] and reports[True]["verdict"] == ("fail" if broken else "pass")
    assert reports[True]["culprits"]["forward"] == ([f"model.layers.{i}.self_attn" for i in range(4)] if broken else [])


@pytest.mark.parametrize("which", ["background", "foreground"])
def test_alongside_waits_for_its_thread_and_hands_on_an_error(which):
    """No thread outlives `alongside`: an error on one side reaches the caller once the
    other side has run to its end."""
    import threading
    import time

    from align.diagnose.observer import alongside

    finished = []

    def work(name):
        def run():
            if name == which:
                raise RuntimeError(f"the {name} failed")
            time.sleep(0.2)  # still running when the other side fails
            finished.append(name)
            return name
        return run

    with pytest.raises(RuntimeError, match=f"the {which} failed"):
        alongside(work("background"), work("foreground"))
    assert finished == ["foreground" if which == "background" else "background"]  # the other side ran to its end
    assert not [t for t in threading.enumerate() if t.name == "align-alongside"]
    assert alongside(lambda: 1, lambda: 2) == (1, 2)


def test_an_error_in_the_forced_pass_alongside_reaches_the_caller(monkeypatch):
    import threading

    from align.core import port as run
    from align.core.port import check_port
    from align.core.reference import run_reference
    from align.diagnose import observer as diagnose

    spec = load_registry(REGISTRY).get("gemma2")
    ref = run_reference(spec)

    def fails(*args, **kwargs):
        raise RuntimeError("the forced pass failed")

    went = []

    def alongside(background, foreground):
        went.append(background)
        return diagnose.alongside(background, foreground)

    monkeypatch.setattr(diagnose, "room_alongside", lambda nbytes: True)
    monkeypatch.setattr(run, "alongside", alongside)
    monkeypatch.setattr(run, "force", fails)
    with pytest.raises(RuntimeError, match="the forced pass failed"):
        check_port(spec, ref, ("float32",))
    assert went, "the run without hooks did not go alongside"
    assert not [t for t in threading.enumerate() if t.name == "align-alongside"]


def test_a_port_that_cannot_be_copied_is_observed_after_the_runs(monkeypatch):
    from align.core.port import check_port
    from align.core.reference import run_reference
    from align.diagnose import observer as diagnose

    spec = load_registry(REGISTRY).get("gemma2")
    ref = run_reference(spec)

    def cannot(self, memo):
        raise TypeError("cannot pickle 'SomeHandle' object")

    from ports.text.gemma2 import Gemma2ForCausalLM

    monkeypatch.setattr(diagnose, "room_alongside", lambda nbytes: True)
    monkeypatch.setattr(Gemma2ForCausalLM, "__deepcopy__", cannot, raising=False)
    report = check_port(spec, ref, ("float32",))
    paddle_observer = report.observer[1]
    assert paddle_observer.checked and not paddle_observer.alongside and not paddle_observer.perturbed


def test_room_alongside_needs_a_second_core_and_memory(monkeypatch):
    from align.diagnose import observer as diagnose

    monkeypatch.setattr(diagnose.os, "sched_getaffinity", lambda pid: {0, 1})
    assert diagnose.room_alongside(1 << 20)
    assert not diagnose.room_alongside(1 << 50)  # a petabyte of weights
    monkeypatch.setattr(diagnose.os, "sched_getaffinity", lambda pid: {0})
    assert not diagnose.room_alongside(1 << 20)


def test_correct_run_records_environment_and_observer(run_cli):
    code, report, _ = run_cli("run", "gemma2", "--dtype", "fp32")
    assert code == 0
    assert all(o["outputs_identical"] and not o["perturbed"] for o in report["observer"])
    env = report["env"]
    assert {"deterministic_algorithms", "tf32_matmul", "tf32_cudnn"} <= set(env["reference"]["determinism"])
    assert env["reference"]["threads"]["intra_op"] >= 1 and env["seeds"] == {"init": 0, "inputs": 1}
    assert env["same_environment"] and env["port"]["paddle"] == env["paddle"] == "3.3.1"
    dtypes = env["dtypes"]
    assert dtypes["model.layers.0.self_attn.q_proj.weight"]["port"] == "float32"
    assert dtypes["model.rotary_emb.inv_freq"] == {"reference": "float32", "port_name": "model.rotary_emb.inv_freq",
                                                   "port": "float32"}
    assert report["findings"] == [] and report["repro"] is None


@pytest.fixture
def buggy_port_registry(tmp_path, monkeypatch):
    """A copy of the Gemma2 port with RMSNorm's `1 +` removed, registered as its own package,
    so that a separate process (the repro script) sees the same bug."""
    pkg = tmp_path / "buggy_gemma2"
    pkg.mkdir()
    source = (PROJECT / "ports" / "text" / "gemma2.py").read_text()
    broken = source.replace('h = h * (1.0 + self.weight.astype("float32"))', 'h = h * self.weight.astype("float32")')
    assert broken != source
    (pkg / "__init__.py").write_text("")
    (pkg / "modeling.py").write_text(broken)
    shutil.copytree(PROJECT / "weights", tmp_path / "weights")
    registry = tmp_path / "align.toml"
    registry.write_text(REGISTRY.read_text().replace('class = "ports.text.gemma2:Gemma2ForCausalLM"',
                                                     'class = "buggy_gemma2.modeling:Gemma2ForCausalLM"')
                        .replace('config_class = "ports.text.gemma2:Gemma2Config"',
                                 'config_class = "buggy_gemma2.modeling:Gemma2Config"'))
    monkeypatch.syspath_prepend(str(tmp_path))
    return registry


def test_repro_reproduces_the_culprit_without_torch(buggy_port_registry, tmp_path):
    from align.cli import main

    out = tmp_path / "report"
    code = main(["--registry", str(buggy_port_registry), "run", "gemma2", "--dtype", "fp32", "--out", str(out), "--quiet"])
    report = json.loads((out / "report.json").read_text())
    assert code == 1 and report["culprits"]["forward"][0] == "model.layers.0.input_layernorm"
    repro = out / report["repro"]
    assert {p.name for p in repro.iterdir()} == {"manifest.json", "repro.py", "tensors.safetensors",
                                                  "weights_ref.safetensors", "weights_port.safetensors"}
    # torch and transformers made unimportable: the repro needs paddle only.
    block = ("import sys, runpy; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
             "sys.argv = ['repro.py']; runpy.run_path('repro.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", block], cwd=repro, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "model.layers.0.input_layernorm (Gemma2RMSNorm)" in proc.stdout
    assert "forward output out: max abs diff" in proc.stdout
    assert "MISMATCH reproduced" in proc.stdout


def test_repro_of_a_fixed_module_matches(buggy_port_registry, tmp_path):
    """The same repro folder, once the port is fixed, says the module matches (exit 0)."""
    from align.cli import main

    out = tmp_path / "report"
    main(["--registry", str(buggy_port_registry), "run", "gemma2", "--dtype", "fp32", "--out", str(out), "--quiet"])
    modeling = tmp_path / "buggy_gemma2" / "modeling.py"
    modeling.write_text((PROJECT / "ports" / "text" / "gemma2.py").read_text())
    proc = subprocess.run([sys.executable, "repro.py"], cwd=out / "repro", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MATCHES the reference" in proc.stdout


def test_only_reports_the_chosen_modules_and_still_catches_their_bug(monkeypatch, run_cli):
    from test_injected_bugs import attention_without_softcap

    code, report, err = run_cli("run", "gemma2", "--dtype", "fp32")
    assert code == 0
    attention_without_softcap(monkeypatch)
    code, full, err = run_cli("run", "gemma2", "--dtype", "fp32")
    # The failure message says how to rerun just the culprit: the same command, narrowed.
    assert f"Rerun: align --registry {REGISTRY} run gemma2 --dtype float32 --only model.layers.0.self_attn" in err
    code, partial, err = run_cli("run", "gemma2", "--dtype", "fp32", "--only", "model.layers.0.self_attn*")
    tf = next(r for r in partial["runs"] if r["mode"] == "teacher_forced" and r["status"] == "ran")
    assert {layer["name"] for layer in tf["layers"]} == {
        "model.layers.0.self_attn", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj"}
    assert code == 1 and partial["only"] == ["model.layers.0.self_attn*"]
    assert partial["culprits"]["forward"] == ["model.layers.0.self_attn"]
    assert "partial: the report is limited to --only model.layers.0.self_attn*" in err


def test_only_that_matches_nothing_is_an_error(run_cli):
    code, report, err = run_cli("run", "gemma2", "--only", "model.layrs.*")
    assert code == 2 and report is None
    assert err.strip().endswith("--only model.layrs.* matches no module of the reference")


def test_each_only_glob_must_match(run_cli):
    # One typo among good globs would otherwise narrow the report silently to the others.
    code, report, err = run_cli("run", "gemma2", "--fast", "--only", "model.norm", "--only", "model.nrom")
    assert code == 2 and report is None and "Traceback" not in err
    assert err.strip().endswith("--only model.nrom matches no module of the reference")


@pytest.mark.skipif(not hasattr(os, "confstr") or "CS_GNU_LIBC_VERSION" not in os.confstr_names,
                    reason="platform.platform() is matched only where glibc reports its version")
def test_the_platform_recorded_is_what_platform_reports():
    """The environment record names the platform as platform.platform() does, without the
    `uname -p` subprocess that starts on every run."""
    import platform

    from align.diagnose.environment import _platform

    assert _platform() == platform.platform()
