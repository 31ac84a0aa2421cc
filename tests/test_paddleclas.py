"""PaddleClas's own backbones (paddleclas 2.6.0) against transformers, across two environments.

The reference runs here; the port runs in .venv-paddleclas (paddleclas pins numpy < 2), through
`align trace` and `align check`. The model code is PaddleClas's as installed: the adapters in
ports/vision/paddleclas.py only build it from the reference config and name its output.
"""

import json

import pytest
from conftest import REGISTRY, ROOT

from align.cli import main

CL_PYTHON = ROOT / ".venv-paddleclas" / "bin" / "python"
pytestmark = pytest.mark.skipif(
    not CL_PYTHON.is_file(),
    reason="no .venv-paddleclas: `make venv-paddleclas` creates it (.ci/run does); "
           "paddleclas 2.6.0 cannot share this environment's numpy 2",
)


def run(model, *args, registry=REGISTRY, tmp):
    out = tmp / model
    code = main(["--registry", str(registry), "run", model, "--dtype", "fp32", "--out", str(out), "--quiet", *args])
    return code, json.loads((out / "report.json").read_text())


def test_paddleclas_vit_matches_transformers(tmp_path):
    """Its fused qkv is judged through the merge rule: the three reference gradients come back
    from the one port tensor, and the pixels' gradient agrees."""
    code, report = run("pc-vit", tmp=tmp_path)
    assert code == 0 and report["verdict"] == "pass", report["culprits"]
    assert not report["env"]["same_environment"]
    names = {p["name"] for p in report["param_grads"]}
    assert {f"vit.layers.0.attention.{x}_proj.weight" for x in "qkv"} <= names
    assert [g["name"] for g in report["input_grads"]] == ["input:pixel_values"]
    assert all(w["exact"] for w in report["weights"] if w["exact"] is not None)


def test_paddleclas_swin_shifts_a_stage_that_is_one_window(tmp_path):
    """The last stage's map is one window: transformers (and the original Swin) do not shift it,
    PaddleClas 2.6.0 rolls it and masks the window into regions. Its shifted block's attention
    is the culprit, forward and backward; every earlier block agrees."""
    code, report = run("pc-swin", tmp=tmp_path)
    assert code == 1
    culprit = "swin.encoder.layers.2.blocks.1.attention"
    assert report["culprits"]["forward"] == [culprit] and report["culprits"]["backward"] == [culprit]
    forced = next(r for r in report["runs"] if r["mode"] == "teacher_forced" and r["dtype"] == "float32")
    failing = [layer["name"] for layer in forced["layers"] if not layer["passed"]]
    assert failing == [culprit, "swin.encoder.layers.2.blocks.1"]  # in the order they return


def test_swin_with_the_shift_clamped_passes(tmp_path):
    """The one change (no shift where the map is a single window) makes PaddleClas's Swin agree:
    the finding is the whole difference."""
    registry = tmp_path / "align.toml"
    text = REGISTRY.read_text().replace('class = "ports.vision.paddleclas:SwinForImageClassification"',
                                        'class = "ports.vision.paddleclas:SwinClampedForImageClassification"')
    registry.write_text(text.replace('environment = ".venv-paddleclas"', f'environment = "{CL_PYTHON.parents[1]}"'))
    (tmp_path / "weights").symlink_to(ROOT / "weights")
    code, report = run("pc-swin", registry=registry, tmp=tmp_path)
    assert code == 0 and report["verdict"] == "pass", report["culprits"]


def test_paddleclas_clip_runs_gelu_where_clip_runs_quick_gelu(tmp_path):
    """PaddleClas's CLIP image tower against transformers' with CLIP's own activation: its MLP
    activation is nn.GELU (its variant table lists no CLIP model under replace_mlp_GELU), so
    every block's activation is the culprit, forward and backward, and nothing else is."""
    code, report = run("pc-clip", tmp=tmp_path)
    assert code == 1
    acts = ["vision_model.encoder.layers.0.mlp.activation_fn", "vision_model.encoder.layers.1.mlp.activation_fn"]
    assert sorted(report["culprits"]["forward"]) == acts and sorted(report["culprits"]["backward"]) == acts
    forced = next(r for r in report["runs"] if r["mode"] == "teacher_forced" and r["dtype"] == "float32")
    assert sorted(layer["name"] for layer in forced["layers"] if not layer["passed"]) == acts
    # the load was exact: the reshaped [CLS] and positions, the fused qkv, the transposed projection
    assert all(w["exact"] for w in report["weights"] if w["exact"] is not None)
    transforms = {w["source"]: w["transform"] for w in report["weights"]}
    assert transforms["vision_model.embeddings.class_embedding"] == "reshape"
    assert transforms["visual_projection.weight"] == "transpose"


def test_paddleclas_clip_with_exact_gelu_passes(tmp_path):
    """The same tower against a reference configured with exact GELU agrees, embeddings and
    every gradient: the activation is the whole difference."""
    code, report = run("pc-clip", "--config", "tiny-gelu", tmp=tmp_path)
    assert code == 0 and report["verdict"] == "pass", report["culprits"]
    assert [o["name"] for o in report["outputs"]] == ["image_embeds"]
    names = {p["name"] for p in report["param_grads"]}
    assert {"visual_projection.weight", "vision_model.embeddings.class_embedding"} <= names
    assert [g["name"] for g in report["input_grads"]] == ["input:pixel_values"]
    assert not [u for u in report["unpaired"] if not u["allowed"]]


def test_a_trace_made_without_the_ports_modules_says_its_truth_forces_more(tmp_path):
    """`align run` asks the port's environment for its module paths before tracing, so the
    float64 truth forces only what PaddleClas's fused port forces; a trace made by hand without
    them (`align trace` alone) forces every call, and the report says what that costs."""
    import subprocess

    trace = tmp_path / "trace"
    assert main(["--registry", str(REGISTRY), "trace", "pc-clip", "--config", "tiny-gelu", "--out", str(trace),
                 "--quiet"]) == 0
    out = tmp_path / "checked"
    proc = subprocess.run([str(CL_PYTHON), "-m", "align", "--registry", str(REGISTRY), "check", "pc-clip", "--trace",
                           str(trace), "--dtype", "fp32", "--out", str(out), "--quiet"], capture_output=True, text=True,
                          timeout=600, check=False)
    report = json.loads((out / "report.json").read_text())
    assert proc.returncode == 0 and report["verdict"] == "pass"
    assert any(w.startswith("the float64 truth was made forcing every reference call") for w in report["warnings"])
    # `align run` traced with the port's modules: no such warning
    code, report = run("pc-clip", "--config", "tiny-gelu", tmp=tmp_path)
    assert code == 0 and not any("float64 truth was made" in w for w in report["warnings"])


def test_paddleclas_vit_matches_timm_name_for_name(tmp_path):
    """PaddleClas's ViT keeps timm's layout: against timm's VisionTransformer no tensor is
    renamed, the fused qkv is one tensor on both sides, and every module of the port pairs."""
    code, report = run("pc-vit-timm", tmp=tmp_path)
    assert code == 0 and report["verdict"] == "pass", report["culprits"]
    assert {w["rule"] for w in report["weights"]} == {"same name"}, \
        {w["rule"] for w in report["weights"]}
    assert {"blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.bias"} <= {p["name"] for p in report["param_grads"]}
    assert not [u for u in report["unpaired"] if not u["allowed"]]
