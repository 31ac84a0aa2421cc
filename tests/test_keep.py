"""`align run --keep GLOB`: the port's full tensors for the modules a user names."""

import json

import pytest
from conftest import REGISTRY
from safetensors.numpy import load_file
from test_injected_bugs import attention_without_softcap

from align.cli import main
from align.compare.metrics import combine, compare_arrays
from align.registry.spec import Tolerance

GLOBS = ("model.layers.1.self_attn", "model.layers.1.mlp")


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory):
    """The tiny Gemma2 with softcapping dropped from every attention, keeping one layer's
    attention (a culprit) and MLP (correct)."""
    mp = pytest.MonkeyPatch()
    attention_without_softcap(mp)
    out = tmp_path_factory.mktemp("reports") / "gemma2"
    try:
        code = main(["--registry", str(REGISTRY), "run", "gemma2", "--dtype", "fp32", "--out", str(out), "--quiet",
                     *[a for g in GLOBS for a in ("--keep", g)]])
    finally:
        mp.undo()
    assert code == 1
    return out


def _kept(out):
    index = json.loads((out / "kept" / "index.json").read_text())
    return index, load_file(str(out / "kept" / "tensors.safetensors"))


def assert_kept_reproduce_report(out, globs):
    """Judging the kept pairs in `out` again gives each kept layer's reported verdict and
    numbers, in every dtype and mode that ran; returns the report."""
    report = json.loads((out / "report.json").read_text())
    index, tensors = _kept(out)
    assert index["globs"] == list(globs)
    assert report["kept"] == {"path": "kept", "globs": list(globs), "tensors": len(index["tensors"])}
    assert {t["owner"] for t in index["tensors"]} == set(globs)  # exact globs: not their children
    checked = 0
    for run in report["runs"]:
        if run["status"] != "ran":
            continue
        for layer in (lay for lay in run["layers"] if lay["name"] in globs):
            tol = Tolerance(**layer["tolerance"])
            for direction in ("forward", "backward"):
                entries = [t for t in index["tensors"] if (t["owner"], t["mode"], t["direction"], t["dtype"])
                           == (layer["name"], run["mode"], direction, run["dtype"])]
                again = combine([compare_arrays(tensors[t["port"]], tensors[t["reference"]], tol, t["label"])
                                 for t in entries])
                reported = layer[direction]
                if reported is None:
                    assert again is None
                    continue
                assert again is not None, (run["mode"], layer["name"], direction)
                assert (again.passed, again.max_abs, again.mismatched, again.numel, again.worst) == \
                    (reported["passed"], reported["max_abs"], reported["mismatched"], reported["numel"],
                     reported["worst"]), (run["mode"], layer["name"], direction)
                checked += 1
    assert checked >= 2 * len(globs)  # each kept layer, forward and backward, in some mode
    return report


def test_kept_tensors_are_exactly_what_was_judged(kept_run):
    """Both modes: teacher-forced, the failing attention fails with the reported worst
    element and the MLP passes; free-running, both are kept too."""
    report = assert_kept_reproduce_report(kept_run, GLOBS)
    assert "model.layers.1.self_attn" in report["culprits"]["forward"]
    for run in (r for r in report["runs"] if r["status"] == "ran"):
        names = {lay["name"]: lay for lay in run["layers"]}
        if run["mode"] == "teacher_forced":  # free-running, the MLP inherits the attention's error
            assert not names["model.layers.1.self_attn"]["passed"] and names["model.layers.1.mlp"]["passed"]
    index, _ = _kept(kept_run)
    assert {t["mode"] for t in index["tensors"]} == {"teacher_forced", "free_running"}


def test_the_page_names_the_kept_tensors(kept_run):
    html = (kept_run / "report.html").read_text()
    assert "kept/tensors.safetensors" in html and "--keep model.layers.1.self_attn model.layers.1.mlp" in html


def test_a_glob_matching_no_module_is_a_usage_error(tmp_path, capsys):
    out = tmp_path / "gemma2"
    code = main(["--registry", str(REGISTRY), "run", "gemma2", "--fast", "--out", str(out), "--quiet",
                 "--keep", "model.layers.1.mlp", "--keep", "model.nosuch*"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--keep model.nosuch* matches no module" in err and len(err.splitlines()) == 1
    assert not out.exists()  # no partial report


def test_a_run_without_keep_leaves_no_stale_tensors(kept_run):
    assert (kept_run / "kept").is_dir()
    assert main(["--registry", str(REGISTRY), "run", "gemma2", "--fast", "--out", str(kept_run), "--quiet"]) == 0
    assert not (kept_run / "kept").exists()
    assert json.loads((kept_run / "report.json").read_text())["kept"] is None
