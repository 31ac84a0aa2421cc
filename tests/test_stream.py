"""Layer-streamed alignment (`align run MODEL --checkpoint DIR --stream-layers`) on the tiny
Gemma2: it must judge exactly what the in-process forced pass judges, catch and localize
bugs inside a block and around the blocks, and refuse what it cannot do in one line."""

import fnmatch

import pytest

from conftest import REGISTRY
from test_injected_bugs import BUGS


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny reference's seeded weights as a safetensors file, tied head left out (as
    save_pretrained does)."""
    from safetensors.numpy import save_file

    from align import build
    from align.spec import load_registry

    spec = load_registry(REGISTRY).get("gemma2")
    ref = build.build_reference(spec, build.reference_config(spec, "tiny"))
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file({k: v.detach().numpy().copy() for k, v in ref.state_dict().items() if k != "lm_head.weight"}, str(path))
    return path


def _by_layer(report: dict) -> dict:
    [run] = [r for r in report["runs"] if r["status"] == "ran" and r["mode"] == "teacher_forced"]
    return {layer["name"]: layer for layer in run["layers"]}


def test_streamed_judges_what_the_whole_model_run_judges(checkpoint, run_cli, bug_ledger):
    code, streamed, _ = run_cli("run", "gemma2", "--checkpoint", str(checkpoint), "--stream-layers")
    bug_ledger.record_clean("layer-streamed", false_alarm=streamed["verdict"] != "pass")
    assert code == 0 and streamed["verdict"] == "pass" and streamed["path"] == "stream"
    _, whole, _ = run_cli("run", "gemma2", "--checkpoint", str(checkpoint), "--fast", "--dtype", "fp32")
    a, b = _by_layer(streamed), _by_layer(whole)
    assert set(a) == set(b) and len(a) == 66
    for name in a:  # the same stretches of code on the same values: the same errors
        for d in ("forward", "backward"):
            if b[name][d] is None:
                assert a[name][d] is None, name
            else:
                assert a[name][d]["max_abs"] == pytest.approx(b[name][d]["max_abs"], rel=1e-6, abs=1e-12), (name, d)
                assert a[name][d]["numel"] == b[name][d]["numel"], (name, d)
    assert {p["name"] for p in streamed["param_grads"]} == {p["name"] for p in whole["param_grads"]}
    assert all(w["exact"] for w in streamed["weights"] if w["exact"] is not None)


@pytest.mark.parametrize("bug", ["rmsnorm_missing_plus_one", "wrong_attention_scale", "detached_gradient_path",
                                 "sliding_window_off_by_one", "final_softcap_removed", "embedding_padding_idx_zeroed"])
def test_streamed_catches_and_localizes(bug, checkpoint, monkeypatch, run_cli, bug_ledger):
    inject, culprit, direction, kind = BUGS[bug]
    inject(monkeypatch)
    code, report, err = run_cli("run", "gemma2", "--checkpoint", str(checkpoint), "--stream-layers")
    detected = code == 1 and report["verdict"] == "fail"
    localized = any(fnmatch.fnmatchcase(c, culprit) for c in report["culprits"][direction])
    bug_ledger.record(f"{bug} (layer-streamed)", kind, detected, localized)
    assert detected and localized, report["culprits"]


def test_streaming_needs_a_checkpoint_and_a_block_list(checkpoint, run_cli, tmp_path):
    code, _, err = run_cli("run", "gemma2", "--stream-layers")
    assert code == 2 and "--stream-layers needs --checkpoint" in err and "Traceback" not in err
    code, _, err = run_cli("run", "phi3", "--checkpoint", str(checkpoint), "--stream-layers")
    assert code == 2 and "models.phi3.stream.blocks" in err and "Traceback" not in err
