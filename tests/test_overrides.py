"""Per-module tolerance overrides: applied to the modules their glob names, and a glob that
names nothing is refused."""

import json
import shutil

from conftest import REGISTRY, ROOT


def _run_with_override(tmp_path, capsys, glob: str, atol: float, rtol: float):
    from align.cli import main

    shutil.copytree(ROOT / "weights", tmp_path / "weights")
    (tmp_path / "align.toml").write_text(
        REGISTRY.read_text() + f'\n[[models.gemma2.tolerance.overrides]]\nglob = "{glob}"\natol = {atol}\nrtol = {rtol}\n')
    out = tmp_path / "report"
    code = main(["--registry", str(tmp_path / "align.toml"), "run", "gemma2", "--fast", "--quiet", "--out", str(out)])
    path = out / "report.json"
    return code, (json.loads(path.read_text()) if path.exists() else None), capsys.readouterr().err


def test_override_applies_to_the_module_it_names(tmp_path, capsys):
    # The correct port's up_proj differs from torch's by float32 rounding (a few 1e-7):
    # within the default 1e-5, beyond an allowance of exactly zero.
    code, report, _ = _run_with_override(tmp_path, capsys, "model.layers.1.mlp.up_proj", 0.0, 0.0)
    tf = report["runs"][0]
    failed = [layer["name"] for layer in tf["layers"] if not layer["passed"]]
    assert code == 1 and failed == ["model.layers.1.mlp.up_proj"]
    assert tf["culprits"]["forward"] == ["model.layers.1.mlp.up_proj"]
    layer = next(layer for layer in tf["layers"] if layer["name"] == "model.layers.1.mlp.up_proj")
    assert layer["tolerance"] == {"atol": 0.0, "rtol": 0.0} and layer["forward"]["max_abs"] > 0
    same = next(layer for layer in tf["layers"] if layer["name"] == "model.layers.2.mlp.up_proj")
    assert same["passed"] and same["tolerance"] == {"atol": 1e-5, "rtol": 1e-5}


def test_override_that_names_nothing_is_an_error(tmp_path, capsys):
    code, report, err = _run_with_override(tmp_path, capsys, "model.layers.*.mpl", 1e-3, 1e-3)
    assert code == 2 and report is None and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert err.strip().endswith("glob 'model.layers.*.mpl' matches no module or parameter")
