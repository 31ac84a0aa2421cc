"""Per-module tolerance overrides: applied to the modules their glob names, and a glob that
names nothing is refused."""

import json
import shutil

from conftest import REGISTRY, ROOT


def _run_with_override(tmp_path, capsys, glob: str, atol: float, rtol: float, *extra: str):
    from align.cli import main

    shutil.copytree(ROOT / "weights", tmp_path / "weights", dirs_exist_ok=True)
    (tmp_path / "align.toml").write_text(
        REGISTRY.read_text() + f'\n[[models.gemma2.tolerance.overrides]]\nglob = "{glob}"\natol = {atol}\nrtol = {rtol}\n')
    out = tmp_path / "report"
    code = main(["--registry", str(tmp_path / "align.toml"), "run", "gemma2", "--fast", "--quiet", "--out", str(out),
                 *extra])
    path = out / "report.json"
    return code, (json.loads(path.read_text()) if path.exists() else None), capsys.readouterr().err


def test_override_applies_to_the_module_it_names(tmp_path, capsys, run_cli):
    # A module the correct port matches only to fp32 rounding (which ones, and by how much,
    # depends on the machine's kernels): within the default 1e-5, beyond an allowance of exactly
    # zero, judged by the literal rule alone (--strict: the float64 truth would let it pass).
    _, plain, _ = run_cli("run", "gemma2", "--fast")
    tf = plain["runs"][0]
    rounded = [layer["name"] for layer in tf["layers"] if layer["name"] and layer["forward"]["max_abs"] > 0]
    assert rounded, "no module differs by rounding here: nothing for an exact override to catch"
    name = rounded[0]
    code, report, _ = _run_with_override(tmp_path, capsys, name, 0.0, 0.0, "--strict")
    tf = report["runs"][0]
    failed = [layer["name"] for layer in tf["layers"] if not layer["passed"]]
    assert code == 1 and failed == [name]
    assert tf["culprits"]["forward"] == [name]
    layer = next(layer for layer in tf["layers"] if layer["name"] == name)
    assert layer["tolerance"] == {"atol": 0.0, "rtol": 0.0} and layer["forward"]["max_abs"] > 0
    others = [layer for layer in tf["layers"] if layer["name"] in rounded[1:]]
    assert others and all(o["passed"] and o["tolerance"] == {"atol": 1e-5, "rtol": 1e-5} for o in others)


def test_override_that_names_nothing_is_an_error(tmp_path, capsys):
    code, report, err = _run_with_override(tmp_path, capsys, "model.layers.*.mpl", 1e-3, 1e-3)
    assert code == 2 and report is None and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert err.strip().endswith("glob 'model.layers.*.mpl' matches no module or parameter")
