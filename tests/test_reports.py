"""The HTML report, the dashboard, JUnit, the gate and re-rendering, all from report.json."""

import copy
import json
import os
import re
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET

import pytest
from conftest import REGISTRY, ROOT
from test_injected_bugs import attention_without_softcap

from align.cli import main
from align.report.html import render_html, render_index
from align.report.junit import render_junit


@pytest.fixture(scope="module")
def passing(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports") / "gemma2"
    assert main(["--registry", str(REGISTRY), "run", "gemma2", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def failing(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    attention_without_softcap(mp)
    try:
        out = tmp_path_factory.mktemp("reports") / "gemma2"
        assert main(["--registry", str(REGISTRY), "run", "gemma2", "--dtype", "fp32", "--out", str(out), "--quiet"]) == 1
    finally:
        mp.undo()
    return out


def load(out):
    from align.report.files import load_report

    return load_report(out / "report.json")


def test_page_shows_what_a_reviewer_needs(passing):
    page = (passing / "report.html").read_text()
    report = load(passing)
    assert '<header class="verdict pass"' in page and "gemma2: PASS" in page
    assert "torch 2.13.0" in page and "paddle 3.3.1" in page and "transformers 5.23.0" in page
    assert "|port - ref| &lt;= 1e-05 + 1e-05 * |ref| elementwise" in page  # the policy in words
    assert "Reproduce: <code>align --registry" in page
    assert page.count("data-module=") == 66  # every teacher-forced module in the tree
    assert page.count('class="series"') == 4  # fwd/bwd x teacher-forced/free-running
    assert 'class="tolerance"' in page
    assert "Weight map" in page and "model.layers.0.self_attn.q_proj.weight" in page
    loaded = [w for w in report["weights"] if w["exact"] is not None]
    assert f"{len(loaded)} of {len(loaded)} loaded port tensors bit-exact" in page and len(loaded) > 40
    assert "Model outputs and parameter gradients (free-running)" in page
    assert "bfloat16 was NOT run" in page and "Observer check" in page
    assert len(page.encode()) < 2 * 1024 * 1024
    assert report["schema_version"] == 3
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing from the network


def test_failing_page_marks_the_divergence_and_culprits(failing):
    page = (failing / "report.html").read_text()
    assert '<header class="verdict fail"' in page
    assert 'href="#first-divergence-forward"' in page and 'id="first-divergence-forward"' in page
    marked = re.search(r'<div class="row fail mark" id="([^"]+)" data-module="model.layers.0.self_attn">', page)
    assert marked, "the first divergence row is not marked"
    assert page.count("badge b-culprit") == 4  # every layer's self_attn holds the bug
    assert "model.layers.0.self_attn: forward output is not close!" in page


def test_model_strings_are_escaped(passing):
    report = copy.deepcopy(load(passing))
    evil = '<script>alert("x")</script>'
    report["runs"][0]["layers"][3]["name"] = f"model.{evil}"
    report["runs"][0]["layers"][3]["type"] = evil
    report["weights"][0]["source"] = evil
    report["warnings"].append(evil)
    report["command"] = evil
    page = render_html(report)
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page


def test_rerender_from_json_alone_is_identical(failing, tmp_path):
    copy_dir = tmp_path / "old"
    shutil.copytree(failing, copy_dir)
    (copy_dir / "report.html").unlink()
    code = main(["report", "render", str(copy_dir)])
    assert code == 1  # the re-rendered report keeps its verdict
    assert (copy_dir / "report.html").read_text() == (failing / "report.html").read_text()


def test_render_refuses_what_is_not_a_report(tmp_path, capsys):
    bad = tmp_path / "report.json"
    bad.write_text('{"hello": 1}')
    assert main(["report", "render", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"align: error: {bad}: schema_version: missing: not a report.json written by align"


def test_junit_one_case_per_model_dtype_mode(passing, failing):
    ok = ET.fromstring(render_junit([load(passing)]))
    cases = ok.findall(".//testcase")
    assert [c.get("name") for c in cases] == ["float32 teacher-forced", "float32 free-running (informational)",
                                              "bfloat16 teacher-forced", "bfloat16 free-running (informational)"]
    assert ok.get("failures") == "0" and ok.get("skipped") == "2"
    assert "no bfloat16 kernels" in cases[2].find("skipped").get("message")
    bad = ET.fromstring(render_junit([load(failing)]))
    failure = bad.find(".//testcase[@name='float32 teacher-forced']/failure")
    assert "forward culprit model.layers.0.self_attn" in failure.get("message")
    assert bad.get("failures") == "1"


def test_dashboard_shows_history(passing, failing, tmp_path):
    from align.report.files import append_history, load_report, write_index

    root = tmp_path / "reports"
    good, bad = load_report(passing / "report.json"), load_report(failing / "report.json")
    for r in (good, bad):
        (root / "gemma2").mkdir(parents=True, exist_ok=True)
        (root / "gemma2" / "report.json").write_text(json.dumps(r, default=str))
        append_history(r, root)
    page = write_index(root).read_text()
    assert '<a href="gemma2/report.html">gemma2</a>' in page
    assert page.index(">pass</span>") < page.index(">fail</span>")  # oldest to newest: the regression shows
    assert "float32: FAIL" in page


def test_gate_passes_and_writes_junit(tmp_path, capsys):
    junit = tmp_path / "junit.xml"
    code = main(["--registry", str(REGISTRY), "gate", "--junit", str(junit), "--reports", str(tmp_path), "--quiet"])
    assert code == 0
    assert ET.parse(junit).getroot().get("failures") == "0"
    assert (tmp_path / "gemma2" / "report.html").is_file() and (tmp_path / "index.html").is_file()
    # The gate path runs no free-running pass: the page must not say its numbers come from one.
    page = (tmp_path / "gemma2" / "report.html").read_text()
    assert "Model outputs and parameter gradients (as the forced pass saw them)" in page


def test_gate_fails_when_a_model_fails(tmp_path, monkeypatch):
    attention_without_softcap(monkeypatch)
    junit = tmp_path / "junit.xml"
    code = main(["--registry", str(REGISTRY), "gate", "--junit", str(junit), "--reports", str(tmp_path), "--quiet"])
    assert code == 1
    failure = ET.parse(junit).getroot().find(".//failure")
    assert failure is not None and "model.layers.0.self_attn" in failure.get("message")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="no chromium on this machine: .ci/run installs Debian's "
                    "chromium (apt-get install chromium); it could not be installed here")
def test_report_renders_in_a_real_browser(failing):
    """As a person sees it: headless Chromium loads the page from disk, runs no network, and
    the DOM it builds has the layer rows, the chart and the first-divergence marker."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={tempfile.mkdtemp()}"]
    url = (failing / "report.html").resolve().as_uri()
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("data-module=") == 66
    assert "<svg" in dom and dom.count('class="series"') == 4
    assert 'id="first-divergence-forward"' in dom
    shots = ROOT / "reports" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / "report-failing.png"
    shot.unlink(missing_ok=True)
    subprocess.run([_chromium(), *flags, "--window-size=1400,2400", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 50_000  # a rendered page, not a blank one
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {shot}")


def test_index_without_reports():
    assert "align dashboard" in render_index({}, [])


def test_index_skips_what_is_not_a_report(passing, tmp_path):
    from align.report.files import write_index

    shutil.copytree(passing, tmp_path / "gemma2")
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "report.json").write_text('{"hello": 1}')
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "report.json").write_text('{"schema_version": 1, "mod')
    page = write_index(tmp_path).read_text()
    assert '<a href="gemma2/report.html">gemma2</a>' in page and "stray" not in page


def test_empty_gate_is_an_error(tmp_path, capsys):
    shutil.copytree(ROOT / "weights", tmp_path / "weights")
    (tmp_path / "align.toml").write_text(REGISTRY.read_text().replace("ci = true", "ci = false"))
    assert main(["--registry", str(tmp_path / "align.toml"), "gate"]) == 2
    assert "no model is marked ci = true" in capsys.readouterr().err
    assert os.path.exists(tmp_path / "align.toml")


def _console_text(report: dict) -> str:
    import io

    from rich.console import Console

    from align.report.console import render_console

    buf = io.StringIO()
    render_console(report, Console(file=buf, width=400, color_system=None))
    return buf.getvalue()


def test_header_says_which_rule_judged_and_the_literal_figure(passing):
    report = load(passing)
    judged = report["judged_by"]
    assert judged["rule"] == "float64"
    lit = judged["literal"]
    every = [m["needed_atol"] for r in report["runs"] if r["status"] == "ran" and r["gated"] and r["dtype"] == "float32"
             for layer in r["layers"] for m in (layer["forward"], layer["backward"]) if m] + \
            [t["needed_atol"] for t in report["outputs"] + report["param_grads"]]
    assert lit["needed_atol"] == max(every) and lit["headroom"] == pytest.approx(1e-5 / max(every))
    line = f"literal figure: worst {lit['needed_atol']:.3g} at {lit['where']} against atol 1e-05"
    assert "judged by the literal tolerance, then the float64 truth" in _console_text(report)
    assert line in _console_text(report) and line in (passing / "report.html").read_text()


def test_the_worst_named_is_a_failing_tensor_and_passing_ones_are_headroom(failing):
    """A passing parameter gradient with a larger difference than the failing one is headroom,
    never "the worst"."""
    report = load(failing)
    grads = report["param_grads"]
    assert len(grads) >= 2
    for g in grads:
        g.update(passed=True, max_abs=1e-7, needed_atol=1e-7)
    loud, quiet = grads[0], grads[1]
    loud.update(passed=True, max_abs=1.0, needed_atol=5e-6)  # close to its allowance, passing
    quiet.update(passed=False, max_abs=3e-5, needed_atol=2.9e-5)
    text = _console_text(report)
    assert f"param grads: 1 FAIL of {len(grads)}, worst failing {quiet['name']} max abs 3.00e-05" in text
    assert "least headroom" not in text.split("param grads:")[1].splitlines()[0]
    quiet.update(passed=True, needed_atol=9e-6)
    text = _console_text(report)
    assert f"param grads: pass, {len(grads)} compared; least headroom {quiet['name']} 9.00e-06 of 1e-05" in text
    assert "FAIL" not in text.split("param grads:")[1].splitlines()[0]


def test_what_the_truth_let_pass_is_marked_in_the_page(failing):
    report = load(failing)
    t = report["param_grads"][0]
    t.update(passed=True, rule="floor", truth_error=2e-6, reference_error=1.5e-6, needed_atol=3e-5)
    page = render_html(report)
    assert "pass (float64)" in page and "float64 truth: port 2.00e-06 vs reference 1.50e-06 RMS from float64" in page
