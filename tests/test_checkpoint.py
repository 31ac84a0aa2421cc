"""Reference weights from a safetensors checkpoint instead of seeded random ones."""

import shutil

import pytest
import torch
from conftest import REGISTRY, ROOT
from safetensors.torch import save_file

from align import builders
from align.registry.load import load_registry


@pytest.fixture(scope="module")
def state():
    spec = load_registry(REGISTRY).get("gemma2")
    ref = builders.build_reference(spec, builders.reference_config(spec, "tiny"))
    # Different from the seeded init, so a pass shows the checkpoint was used.
    sd = {k: (v + 0.01 * torch.randn_like(v)).contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    return sd


def test_checkpoint_aligns(tmp_path, state, run_cli):
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    code, report, _ = run_cli("run", "gemma2", "--dtype", "fp32", "--checkpoint", str(path))
    assert code == 0 and report["verdict"] == "pass" and report["checkpoint"] == str(path)


def test_nan_in_checkpoint_never_passes(tmp_path, state, run_cli):
    bad = dict(state)
    w = bad["model.layers.2.mlp.down_proj.weight"].clone()
    w[0, 0] = float("nan")
    bad["model.layers.2.mlp.down_proj.weight"] = w
    path = tmp_path / "nan.safetensors"
    save_file(bad, str(path))
    code, report, err = run_cli("run", "gemma2", "--dtype", "fp32", "--checkpoint", str(path))
    assert code == 1 and report["verdict"] == "fail"
    assert report["first_divergence"]["forward"] == "model.layers.2.mlp.down_proj"
    assert "NaN or Inf" in err


def test_checkpoint_that_does_not_fit(tmp_path, state, run_cli):
    path = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in state.items() if k != "model.norm.weight"}, str(path))
    code, report, err = run_cli("run", "gemma2", "--checkpoint", str(path))
    assert code == 2 and report is None
    assert err.strip() == f"align: error: {path}: does not fit Gemma2ForCausalLM: missing ['model.norm.weight'], unexpected []"


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".pdparams"])
def test_pickle_checkpoints_are_refused(tmp_path, suffix, run_cli):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not even read")
    code, report, err = run_cli("run", "gemma2", "--checkpoint", str(path))
    assert code == 2 and report is None
    assert "pickle-based checkpoints are refused" in err


def test_truncated_safetensors(tmp_path, state, run_cli):
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, _, err = run_cli("run", "gemma2", "--checkpoint", str(path))
    assert code == 2 and err.startswith(f"align: error: {path}: truncated: tensor ")


def test_rules_that_do_not_fit_the_port(tmp_path, capsys):
    from align.cli import main

    shutil.copytree(ROOT / "weights", tmp_path / "weights")
    (tmp_path / "align.toml").write_text(REGISTRY.read_text())
    rules = tmp_path / "weights" / "gemma2.toml"
    rules.write_text(rules.read_text() + '\n[[rename]]\nfrom = "model\\\\.norm\\\\.(.*)"\nto = "model.final_norm.\\\\1"\n')
    code = main(["--registry", str(tmp_path / "align.toml"), "run", "gemma2", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("align: error: model.norm.weight: unmapped reference tensor (rename ")
    assert "gives 'model.final_norm.weight', which the port does not have" in err
