"""Split execution: `align trace` runs only the reference, `align check` only the port."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import REGISTRY, ROOT
from test_injected_bugs import attention_without_softcap

from align.cli import main


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "gemma2"
    assert main(["--registry", str(REGISTRY), "trace", "gemma2", "--out", str(path), "--quiet"]) == 0
    return path


def layers(report, mode):
    run = next(r for r in report["runs"] if r["dtype"] == "float32" and r["mode"] == mode)
    return {layer["name"]: (layer["forward"], layer["backward"]) for layer in run["layers"]}


def test_check_gives_the_in_process_report(trace, run_cli):
    _, split, _ = run_cli("check", "gemma2", "--trace", str(trace), "--dtype", "fp32")
    _, joint, _ = run_cli("run", "gemma2", "--dtype", "fp32")
    assert split["verdict"] == joint["verdict"] == "pass"
    for mode in ("teacher_forced", "free_running"):
        assert layers(split, mode) == layers(joint, mode)  # the very same numbers
    assert split["param_grads"] == joint["param_grads"] and split["outputs"] == joint["outputs"]
    assert split["env"]["reference"]["torch"].startswith("2.13.0")  # the trace records its versions


def test_check_runs_without_torch(trace, tmp_path):
    """The port side in its own process, where torch and transformers cannot even be imported."""
    tmp_path = tmp_path / "report"
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from align.cli import main\n"
            f"sys.exit(main(['--registry', {str(REGISTRY)!r}, 'check', 'gemma2', '--trace', {str(trace)!r}, "
            f"'--out', {str(tmp_path)!r}, '--quiet']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["verdict"] == "pass" and report["env"]["same_environment"]  # same venv, other process


def test_broken_port_is_caught_through_a_trace(trace, monkeypatch, run_cli):
    attention_without_softcap(monkeypatch)
    code, report, _ = run_cli("check", "gemma2", "--trace", str(trace), "--dtype", "fp32")
    assert code == 1 and report["first_divergence"]["forward"] == "model.layers.0.self_attn"


def test_trace_for_another_model_is_refused(trace, capsys):
    assert main(["--registry", str(REGISTRY), "check", "phi3", "--trace", str(trace)]) == 2
    assert "the trace was made for model 'gemma2', not 'phi3'" in capsys.readouterr().err


def test_trace_that_no_longer_matches_the_registry_is_refused(trace, tmp_path, capsys):
    shutil.copytree(ROOT / "weights", tmp_path / "weights")
    registry = tmp_path / "align.toml"
    registry.write_text(REGISTRY.read_text().replace("sliding_window = 6", "sliding_window = 5", 1))
    assert main(["--registry", str(registry), "check", "gemma2", "--trace", str(trace)]) == 2
    assert "no longer matches this registry's config, rules, inputs or init" in capsys.readouterr().err


def test_corrupt_trace_is_refused(trace, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(trace, broken)
    (broken / "calls" / "00003.safetensors").unlink()
    assert main(["--registry", str(REGISTRY), "check", "gemma2", "--trace", str(broken)]) == 2
    assert "corrupt or incomplete trace" in capsys.readouterr().err
    assert main(["--registry", str(REGISTRY), "check", "gemma2", "--trace", str(tmp_path / "nothing")]) == 2
    assert "not a trace: no manifest.json" in capsys.readouterr().err


def test_existing_trace_needs_force(trace, capsys):
    assert main(["--registry", str(REGISTRY), "trace", "gemma2", "--out", str(trace)]) == 2
    assert "already exists (pass --force" in capsys.readouterr().err


def test_trace_is_written_as_it_goes(tmp_path):
    """Each call's file is on disk as soon as it is handed over, before the run ends, and the
    reference's run keeps no per-call tensors once they are written."""
    from align.core.reference import run_reference
    from align.core.trace_io import TraceWriter, read_trace
    from align.registry.load import load_registry

    spec = load_registry(REGISTRY).get("gemma2")
    seen = []
    with TraceWriter(tmp_path / "t") as writer:
        add = writer.add

        def watching(name, call):
            add(name, call)
            seen.append(len(list((writer.tmp / "calls").iterdir())))

        writer.add = watching
        run = run_reference(spec, sink=writer)
        assert not (tmp_path / "t").exists()  # nothing at the destination until finish()
        writer.finish(run)
    assert seen == list(range(1, len(run.trace.calls) + 1))
    assert all(not c.outputs and not c.grads and not c.input_grads for c in run.trace.calls.values())
    back = read_trace(tmp_path / "t")
    assert len(back.trace.calls) == 66
    # The gradients at both boundaries come back: what teacher forcing seeds and judges with.
    layer = back.trace.calls["model.layers.0"]
    assert set(layer.input_grads) == {"hidden_states"} and set(layer.grads) == {"out"}


def test_partial_trace_round_trips(tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["--registry", str(REGISTRY), "trace", "gemma2", "--out", str(out), "--quiet"]) == 0
    from align.core.reference import run_reference
    from align.core.trace_io import read_trace, write_trace
    from align.registry.load import load_registry

    spec = load_registry(REGISTRY).get("gemma2")
    write_trace(run_reference(spec, only=("model.norm",)), tmp_path / "p")
    partial = read_trace(tmp_path / "p")
    assert partial.only == ("model.norm",)
    assert len(partial.trace.calls) == len(read_trace(out).trace.calls)


@pytest.mark.parametrize("broken", [False, True])
def test_a_released_reference_gives_the_same_report(monkeypatch, broken):
    """check_port(release=True) drops the reference's recorded tensors once the free-running
    run is done with them (so a port observer run made after it reuses their memory): same
    report, repro included, and only when asked (a reference shared by several ports is
    released by none)."""
    from align.core.port import check_port
    from align.core.reference import run_reference
    from align.registry.load import load_registry

    if broken:
        attention_without_softcap(monkeypatch)
    spec = load_registry(REGISTRY).get("gemma2")
    ref = run_reference(spec)
    held = lambda: [(len(c.args), len(c.outputs), len(c.grads), len(c.input_grads)) for c in ref.trace.calls.values()]
    recorded = held()
    kept = check_port(spec, ref, ("float32",)).to_dict()
    assert held() == recorded and all(n[1] for n in recorded) and any(n[2] and n[3] for n in recorded)
    released = check_port(spec, ref, ("float32",), release=True)
    assert not any(c.outputs or c.grads or c.input_grads or c.args or c.kwargs for c in ref.trace.calls.values())
    assert not ref.trace.param_grads and not ref.weights
    assert (released.repro is not None) == broken
    released = released.to_dict()
    for report in (kept, released):
        report.pop("created")
    assert released == kept and released["verdict"] == ("fail" if broken else "pass")


def test_check_only_narrows_the_report_and_its_rerun_hint(trace, monkeypatch, run_cli):
    attention_without_softcap(monkeypatch)
    code, report, err = run_cli("check", "gemma2", "--trace", str(trace), "--dtype", "fp32",
                                "--only", "model.layers.1.self_attn*")
    tf = next(r for r in report["runs"] if r["mode"] == "teacher_forced")
    assert code == 1 and report["only"] == ["model.layers.1.self_attn*"]
    assert {layer["name"] for layer in tf["layers"]} == {
        "model.layers.1.self_attn", *(f"model.layers.1.self_attn.{p}_proj" for p in "qkvo")}
    assert tf["culprits"]["forward"] == ["model.layers.1.self_attn"]
    # The hint reruns the same check, narrowed: not an `align run` of something else.
    assert (f"Rerun: align --registry {REGISTRY} check gemma2 --trace {trace} --dtype float32 "
            "--only model.layers.1.self_attn") in " ".join(err.split())


def test_check_only_that_matches_nothing_is_an_error(trace, run_cli):
    code, report, err = run_cli("check", "gemma2", "--trace", str(trace), "--only", "model.layers.1.self_atn*")
    assert code == 2 and report is None and "Traceback" not in err
    assert err.strip().endswith("--only model.layers.1.self_atn* matches no module of the reference")
