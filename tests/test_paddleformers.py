"""PaddleFormers' own Llama, Qwen2 and Phi3 against transformers, across two environments.

The reference runs here (torch, transformers 5.23); the port runs in .venv-paddleformers
(paddleformers 1.2.0 needs transformers < 5.4), through `align trace` and `align check`.
"""

import json
import shutil

import pytest
from conftest import REGISTRY, ROOT

from align.cli import main

PF_PYTHON = ROOT / ".venv-paddleformers" / "bin" / "python"
pytestmark = pytest.mark.skipif(
    not PF_PYTHON.is_file(),
    reason="no .venv-paddleformers: `make venv-paddleformers` creates it (.ci/run does); "
           "paddleformers cannot share this environment's transformers 5.23",
)


def run(model, *args, registry=REGISTRY, tmp):
    out = tmp / model
    out.parent.mkdir(parents=True, exist_ok=True)
    code = main(["--registry", str(registry), "run", model, "--dtype", "fp32", "--out", str(out), "--quiet", *args])
    return code, json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("model", ["pf-llama", "pf-qwen2"])
@pytest.mark.parametrize("weights_from", ["rules", "pretrained"])
def test_without_a_pad_token_paddleformers_matches_transformers(model, weights_from, tmp_path):
    """Weights by align's rules, and by PaddleFormers' own HF loader: both pass, and the loader's
    tensors are bit-exact with what the rules say (no loader_mismatch)."""
    code, report = run(model, "--config", "nopad", "--weights-from", weights_from, tmp=tmp_path)
    assert code == 0 and report["verdict"] == "pass", report["culprits"]
    assert not report["env"]["same_environment"]  # the port ran in the other venv (its own numpy)
    assert report["env"]["port"]["process"]["numpy"] != report["env"]["reference"]["process"]["numpy"]
    assert all(w["exact"] for w in report["weights"] if w["exact"] is not None)
    assert report["weights_from"] == weights_from


def test_llama_zeroes_the_pad_embedding(tmp_path):
    """PaddleFormers' Llama hands padding_idx to paddle's Embedding, which returns zeros for the
    pad row; transformers returns the stored row (and only withholds its gradient). The
    embedding's tensors, kept by `align check` in the other environment, show it."""
    import numpy as np
    from safetensors.numpy import load_file

    code, report = run("pf-llama", "--keep", "model.embed_tokens", tmp=tmp_path)
    assert code == 1
    assert report["culprits"]["forward"] == ["model.embed_tokens"] and report["culprits"]["backward"] == []
    embed = next(layer for layer in report["runs"][0]["layers"] if layer["name"] == "model.embed_tokens")
    assert embed["forward"]["mismatched"] == 3 * 64  # exactly the 3 left-pad positions, all 64 channels
    assert embed["forward"]["max_rel"] == 1.0  # zeros where the reference has the stored row
    index = json.loads((tmp_path / "pf-llama" / "kept" / "index.json").read_text())
    tensors = load_file(str(tmp_path / "pf-llama" / "kept" / "tensors.safetensors"))
    [out] = [t for t in index["tensors"] if t["mode"] == "teacher_forced" and t["label"] == "output out"]
    port, ref = tensors[out["port"]], tensors[out["reference"]]
    differs = np.argwhere(np.any(port != ref, axis=-1))  # (batch, position) pairs
    assert len(differs) == 3 and not port[tuple(differs.T)].any() and ref[tuple(differs.T)].all()


@pytest.mark.parametrize("model", ["pf-qwen2", "pf-phi3"])
def test_qwen2_and_phi3_update_the_pad_embedding(model, tmp_path):
    """The mirror image: their embeddings give the pad row a gradient that transformers withholds."""
    code, report = run(model, tmp=tmp_path)
    assert code == 1
    assert report["culprits"]["forward"] == [] and report["culprits"]["backward"] == ["model.embed_tokens"]
    [bad] = [p for p in report["param_grads"] if not p["passed"]]
    assert bad["name"] == "model.embed_tokens.weight" and bad["worst"].startswith("model.embed_tokens.weight[0,")
    assert all(o["passed"] for o in report["outputs"])  # logits and loss agree


def test_wrong_qkv_grouping_is_caught(tmp_path):
    """The fused qkv merged as a plain [q | k | v] instead of per KV head: the verifier catches it."""
    shutil.copytree(ROOT / "weights", tmp_path / "weights")
    rules = tmp_path / "weights" / "pf-qwen2.toml"
    rules.write_text(rules.read_text().replace('groups = "num_key_value_heads"', "groups = 1"))
    registry = tmp_path / "align.toml"
    registry.write_text(REGISTRY.read_text().replace('environment = ".venv-paddleformers"',
                                                     f'environment = "{PF_PYTHON.parents[1]}"'))
    code, report = run("pf-qwen2", "--config", "nopad", registry=registry, tmp=tmp_path)
    assert code == 1
    assert report["culprits"]["forward"] == ["model.layers.0.self_attn", "model.layers.1.self_attn",
                                             "model.layers.2.self_attn"]
    # With PaddleFormers' own loader the port is right, and the disagreement with the (wrong)
    # rules is reported tensor by tensor instead.
    code, report = run("pf-qwen2", "--config", "nopad", "--weights-from", "pretrained", registry=registry,
                       tmp=tmp_path / "loader")
    mismatches = sorted(f["name"] for f in report["findings"] if f["kind"] == "loader_mismatch")
    assert code == 1 and report["culprits"]["forward"] == []
    assert mismatches == [f"model.layers.{i}.self_attn.q_proj.{p} + model.layers.{i}.self_attn.k_proj.{p} + "
                          f"model.layers.{i}.self_attn.v_proj.{p}" for i in range(3) for p in ("bias", "weight")]
