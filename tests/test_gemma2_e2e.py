"""The tiny Gemma2, end to end through the command line: aligned, every layer paired."""

import subprocess
import sys

import pytest
from conftest import REGISTRY


@pytest.fixture(scope="module")
def passing(tmp_path_factory):
    import json

    from align.cli import main

    out = tmp_path_factory.mktemp("gemma2")
    code = main(["--registry", str(REGISTRY), "run", "gemma2", "--out", str(out), "--quiet"])
    return code, json.loads((out / "report.json").read_text()), out


def test_correct_port_passes(passing):
    code, report, _ = passing
    assert code == 0 and report["verdict"] == "pass"


def test_report_keys_are_stable(passing):
    _, report, _ = passing
    assert {"schema_version", "verdict", "model", "runs", "first_divergence", "outputs", "weights", "env",
            "command"} <= set(report)
    assert report["model"] == "gemma2" and report["command"].startswith("align ")
    for run in report["runs"]:
        assert {"dtype", "mode", "tolerance", "layers"} <= set(run)
        for layer in run["layers"]:
            assert {"name", "forward", "backward"} <= set(layer)
            assert {"max_abs", "mean_abs", "max_rel", "cosine", "passed"} <= set(layer["forward"])
    assert {"torch", "paddle", "transformers", "reference", "port", "seeds"} <= set(report["env"])


def test_fp32_both_modes_forward_and_backward_all_paired(passing):
    _, report, _ = passing
    fp32 = {r["mode"]: r for r in report["runs"] if r["dtype"] == "float32"}
    assert set(fp32) == {"teacher_forced", "free_running"}
    assert report["unpaired"] == []
    for run in fp32.values():
        names = {layer["name"] for layer in run["layers"]}
        # Every executed module of the reference is there, parameter-less ones included.
        for expected in ("<root>", "model", "model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head",
                         "model.layers.3.self_attn.o_proj", "model.layers.1.mlp.act_fn",
                         "model.layers.2.post_feedforward_layernorm"):
            assert expected in names
        assert len(run["layers"]) == 66
        assert run["passed"] and all(layer["passed"] for layer in run["layers"])
        with_grad = [layer for layer in run["layers"] if layer["backward"] is not None]
        assert len(with_grad) >= 60  # everything but the no-grad rotary embedding and the like


def test_outputs_and_param_grads_are_compared(passing):
    _, report, _ = passing
    assert {o["name"] for o in report["outputs"]} == {"logits", "loss"}
    assert len(report["param_grads"]) == 46  # 47 reference tensors, lm_head tied to the embedding
    assert all(p["passed"] for p in report["param_grads"])


def test_weights_are_bit_exact_and_transposed_by_type(passing):
    _, report, _ = passing
    by_source = {w["source"]: w for w in report["weights"]}
    assert by_source["model.layers.0.self_attn.q_proj.weight"]["transform"] == "transpose"
    assert by_source["model.embed_tokens.weight"]["transform"] == "copy"
    assert by_source["lm_head.weight"]["transform"] == "tied"
    assert all(w["exact"] for w in report["weights"])


def test_bf16_says_plainly_it_did_not_run(passing):
    _, report, _ = passing
    bf16 = [r for r in report["runs"] if r["dtype"] == "bfloat16"]
    assert bf16 and all(r["status"] == "not_run" and r["passed"] is None for r in bf16)
    assert all("bfloat16" in r["reason"] for r in bf16)
    assert any(w.startswith("bfloat16 was NOT run") for w in report["warnings"])


def test_only_bf16_requested_on_cpu_is_not_a_pass(run_cli):
    code, report, err = run_cli("run", "gemma2", "--dtype", "bf16")
    assert code == 1 and report["verdict"] == "error"


def test_html_written_and_escaped(passing):
    _, _, out = passing
    page = (out / "report.html").read_text()
    assert "&lt;root&gt;" in page and "<root>" not in page
    assert "model.layers.0.self_attn.q_proj" in page


def test_command_line_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "align", "--registry", str(REGISTRY), "run", "gemma2",
                           "--dtype", "fp32", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "gemma2 (tiny config, ports.text.gemma2:Gemma2ForCausalLM): PASS" in proc.stderr
    assert (tmp_path / "report.json").is_file() and (tmp_path / "report.html").is_file()
