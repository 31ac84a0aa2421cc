"""Models that are not transformers text models: a ViT fed pixels, and auraloss' parameter-less
losses fed waveforms. The correct ports pass with their input gradients judged; broken ports
fail and name the module holding the bug; and every way a run can go wrong says what
happened: a port output of the wrong shape, a port that raises, a reference or recipe that
raises (the user's to fix, exit 2) and align failing itself (exit 3)."""

import fnmatch
import json
import shutil
import subprocess
import sys

import paddle
import pytest
from conftest import REGISTRY, ROOT, after_init

from ports.audio import auraloss as A
from ports.vision import vit as V


@pytest.mark.parametrize("model", ["vit", "vit-timm", "sisdr", "mrstft"])
def test_correct_port_passes_with_its_input_gradient(model, run_cli, bug_ledger):
    code, report, _ = run_cli("run", model, "--dtype", "fp32")
    bug_ledger.record_clean(model, false_alarm=report["verdict"] != "pass")
    assert code == 0 and report["verdict"] == "pass", report["problems"]
    grads = {g["name"]: g for g in report["input_grads"]}
    graded = {"vit": "input:pixel_values", "vit-timm": "input:pixel_values", "sisdr": "input:input",
              "mrstft": "input:x"}[model]
    assert set(grads) == {graded} and grads[graded]["passed"] and grads[graded]["numel"] > 0
    assert {r["mode"] for r in report["runs"] if r["status"] == "ran"} == {"teacher_forced", "free_running"}
    if model == "vit-timm":  # timm's bare logits answer the port's ViTImageClassifierOutput.logits
        assert [o["name"] for o in report["outputs"]] == ["out"] and report["outputs"][0]["numel"] > 0
        # the split qkv's gradients come back joined, judged against timm's fused ones
        fused = [p for p in report["param_grads"] if ".attn.qkv." in p["name"]]
        assert len(fused) == 4 and all(p["passed"] for p in fused)
        assert not [p for p in report["param_grads"] if "port only" in p["name"]]
    if not model.startswith("vit"):  # a loss: no parameter, so nothing to load or to compare but outputs and inputs
        assert report["param_grads"] == [] and report["weights"] == []
        assert [o["name"] for o in report["outputs"]] == ["out"]


def test_the_gate_path_judges_input_gradients_too(run_cli):
    code, report, _ = run_cli("run", "sisdr", "--dtype", "fp32", "--fast")
    assert code == 0 and [g["name"] for g in report["input_grads"]] == ["input:input"]


# --- broken ports -------------------------------------------------------------------------------

def patch_tokens_transposed(mp):
    """The patch embedding's (B, h, N) left untransposed: an output of the wrong shape."""
    def forward(self, pixel_values):
        return self.projection(pixel_values).flatten(2)

    mp.setattr(V.ViTPatchEmbeddings, "forward", forward)


def attention_scaled_by_head_dim(mp):
    after_init(mp, V.ViTAttention, lambda self, *a: setattr(self, "scaling", self.head_dim ** -1.0))


def positions_before_cls(mp):
    """Position rows added to the patches before [CLS] is prepended: [CLS] gets no position."""
    def forward(self, pixel_values, interpolate_pos_encoding=False):
        patches = self.patch_embeddings(pixel_values) + self.position_embeddings[:, 1:]
        cls = self.cls_token.expand([pixel_values.shape[0], -1, -1])
        return self.dropout(paddle.concat([cls, patches], axis=1))

    mp.setattr(V.ViTEmbeddings, "forward", forward)


def pixel_gradient_cut(mp):
    def forward(self, pixel_values):
        return self.projection(pixel_values.detach()).flatten(2).transpose([0, 2, 1])

    mp.setattr(V.ViTPatchEmbeddings, "forward", forward)


def mean_not_removed(mp):
    after_init(mp, A.SISDRLoss, lambda self, *a, **k: setattr(self, "zero_mean", False))


def projection_detached(mp):
    """The target's projection taken as a constant: the loss is right, its gradient is not."""
    forward = A.SISDRLoss.forward

    def detached(self, input, target):
        T = input.shape[-1]
        input = input - A._sum_fp64(input, axis=-1).unsqueeze(-1) / T
        target = target - A._sum_fp64(target, axis=-1).unsqueeze(-1) / T
        alpha = (A._sum_fp64(input * target, axis=-1) / (A._sum_fp64(target ** 2, axis=-1) + self.eps)).detach()
        target = target * alpha.unsqueeze(-1)
        ratio = A._sum_fp64(target ** 2, axis=-1) / (A._sum_fp64((input - target) ** 2, axis=-1) + self.eps)
        return -A._apply_reduction(10 * paddle.log10(ratio + self.eps), self.reduction)

    assert forward is not detached
    mp.setattr(A.SISDRLoss, "forward", detached)


def window_not_periodic(mp):
    """The symmetric Hann window (numpy's np.hanning) where torch's default is periodic."""
    window = A._torch_window

    def symmetric(name, length):
        assert name == "hann_window"
        return paddle.to_tensor(__import__("numpy").hanning(length).astype("float32"))

    assert window is not symmetric
    mp.setattr(A, "_torch_window", symmetric)


def constant_padding(mp):
    stft = A._stft

    def padded(x, n_fft, hop_length, win_length, window):
        left = (n_fft - win_length) // 2
        window = paddle.nn.functional.pad(window, [left, n_fft - win_length - left], mode="constant")
        pad = n_fft // 2
        x = paddle.nn.functional.pad(x.unsqueeze(1), [pad, pad], mode="constant", data_format="NCL").squeeze(1)
        frames = paddle.signal.frame(x, n_fft, hop_length, axis=-1)
        return paddle.fft.rfft(frames * window.unsqueeze(-1), axis=1)

    assert stft is not padded
    mp.setattr(A, "_stft", padded)


BUGS = {  # name: (inject, model, culprit glob, direction)
    "vit:patch_tokens_transposed": (patch_tokens_transposed, "vit", "vit.embeddings.patch_embeddings", "forward"),
    "vit:attention_scaled_by_head_dim": (attention_scaled_by_head_dim, "vit", "vit.layers.0.attention", "forward"),
    "vit:positions_before_cls": (positions_before_cls, "vit", "vit.embeddings", "forward"),
    "vit:pixel_gradient_cut": (pixel_gradient_cut, "vit", "vit.embeddings.patch_embeddings", "backward"),
    # the same port against timm: the culprits carry timm's names, and timm's root adds the
    # positions itself (_pos_embed), so a positions bug is the root's
    "vit-timm:attention_scaled_by_head_dim": (attention_scaled_by_head_dim, "vit-timm", "blocks.0.attn", "forward"),
    "vit-timm:positions_before_cls": (positions_before_cls, "vit-timm", "<root>", "forward"),
    "vit-timm:pixel_gradient_cut": (pixel_gradient_cut, "vit-timm", "patch_embed", "backward"),
    "sisdr:mean_not_removed": (mean_not_removed, "sisdr", "<root>", "forward"),
    "sisdr:projection_detached": (projection_detached, "sisdr", "<root>", "backward"),
    "mrstft:window_not_periodic": (window_not_periodic, "mrstft", "stft_losses.0", "forward"),
    "mrstft:constant_padding": (constant_padding, "mrstft", "stft_losses.0", "forward"),
}


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_broken_port_fails_and_is_localized(bug, monkeypatch, run_cli, bug_ledger):
    inject, model, culprit, direction = BUGS[bug]
    inject(monkeypatch)
    code, report, err = run_cli("run", model, "--dtype", "fp32")
    fd, culprits = report["first_divergence"], report["culprits"]
    detected = code == 1 and report["verdict"] == "fail"
    localized = (fd[direction] is not None and fnmatch.fnmatchcase(fd[direction], culprit)
                 and any(fnmatch.fnmatchcase(c, culprit) for c in culprits[direction]))
    bug_ledger.record(bug, "non-text model", detected, localized)
    assert detected and localized, (fd, culprits, report["problems"])
    assert "Traceback" not in err


def test_an_output_of_the_wrong_shape_is_named_with_both_shapes(monkeypatch, run_cli):
    patch_tokens_transposed(monkeypatch)
    code, report, err = run_cli("run", "vit", "--dtype", "fp32")
    assert code == 1
    tf = next(r for r in report["runs"] if r["mode"] == "teacher_forced")
    layer = next(layer for layer in tf["layers"] if layer["name"] == "vit.embeddings.patch_embeddings")
    assert "shape mismatch: port (2, 64, 16) vs reference (2, 16, 64)" in layer["forward"]["note"]
    # Handed on, the reference's value lets every module after it be judged on its own.
    assert tf["culprits"]["forward"] == ["vit.embeddings.patch_embeddings"]
    assert all(layer["passed"] for layer in tf["layers"] if layer["name"].startswith("vit.layers."))


def test_the_pixel_gradient_is_judged_where_it_is_cut(monkeypatch, run_cli):
    pixel_gradient_cut(monkeypatch)
    _, report, _ = run_cli("run", "vit", "--dtype", "fp32")
    [grad] = report["input_grads"]
    assert grad["name"] == "input:pixel_values" and not grad["passed"]


# --- a port that raises ---------------------------------------------------------------------

def test_a_port_that_raises_fails_in_the_module_it_raised_in(monkeypatch, run_cli):
    def boom(self, hidden_states):
        raise RuntimeError("the MLP is not written yet")

    monkeypatch.setattr(V.ViTMLP, "forward", boom)
    code, report, err = run_cli("run", "vit", "--dtype", "fp32")
    assert code == 1 and report["verdict"] == "fail" and "Traceback" not in err
    tf = next(r for r in report["runs"] if r["mode"] == "teacher_forced")
    layers = {layer["name"]: layer for layer in tf["layers"]}
    assert layers["vit.layers.0.mlp"]["forward"]["note"] == "the port raised RuntimeError: the MLP is not written yet"
    assert tf["culprits"]["forward"] == ["vit.layers.0.mlp"]
    unreached = [n for n, layer in layers.items() if not layer["reached"]]
    assert "vit.layers.1.attention" in unreached and "classifier" in unreached
    free = next(r for r in report["runs"] if r["mode"] == "free_running")
    assert free["status"] == "not_run" and free["reason"] == "the port raised in vit.layers.0.mlp"


# --- the user's mistakes: exit 2, one line --------------------------------------------------

@pytest.fixture
def registry_copy(tmp_path):
    shutil.copytree(ROOT / "weights", tmp_path / "weights")
    path = tmp_path / "align.toml"
    path.write_text(REGISTRY.read_text())
    return path


def test_a_wrong_split_rule_loads_exactly_and_fails_where_it_is_used(registry_copy, capsys):
    """q and k swapped in vit-timm's split of timm's fused qkv: the load is bit-exact (the
    rules are followed to the letter), and the attention that uses them is the culprit."""
    from align.cli import main

    rules = registry_copy.parent / "weights" / "vit-timm.toml"
    good = "'vit.layers.\\1.attention.q_proj.weight', 'vit.layers.\\1.attention.k_proj.weight'"
    assert good in rules.read_text()
    rules.write_text(rules.read_text().replace(good, good.replace("q_proj", "TMP").replace("k_proj", "q_proj")
                                               .replace("TMP", "k_proj")))
    out = registry_copy.parent / "out"
    code = main(["--registry", str(registry_copy), "run", "vit-timm", "--dtype", "fp32", "--out", str(out), "--quiet"])
    report = json.loads((out / "report.json").read_text())
    assert code == 1 and all(w["exact"] for w in report["weights"])
    assert report["culprits"]["forward"] == ["blocks.0.attn", "blocks.1.attn"], report["culprits"]
    assert "Traceback" not in capsys.readouterr().err


def _one_line(registry, *args):
    proc = subprocess.run([sys.executable, "-m", "align", "--registry", str(registry), *args, "--quiet",
                           "--out", str(registry.parent / "out")], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    lines = proc.stderr.strip().splitlines()
    return proc.returncode, lines


def test_a_recipe_that_does_not_fit_the_reference_is_the_users(registry_copy):
    text = registry_copy.read_text().replace("[models.sisdr.configs.tiny]", '''[models.sisdr.inputs.weights]
kind = "float"
shape = [2]

[models.sisdr.configs.tiny]''')
    registry_copy.write_text(text)
    code, lines = _one_line(registry_copy, "run", "sisdr")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"align: error: {registry_copy}: models.sisdr.reference: the reference raised in "
                               "module <root> on the recipe's inputs (models.sisdr.inputs): TypeError: ")
    assert "weights" in lines[0]


def test_a_builder_that_raises_is_the_users(registry_copy):
    registry_copy.write_text(registry_copy.read_text().replace("zero_mean = true", "zero_means = true"))
    code, lines = _one_line(registry_copy, "run", "sisdr")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"align: error: {registry_copy}: models.sisdr.reference.class (or builder): "
                               "auraloss.time:SISDRLoss raised TypeError: ")


def test_a_dimension_the_config_lacks_names_the_input(registry_copy):
    registry_copy.write_text(registry_copy.read_text().replace('channels = "num_channels"', 'channels = "channels"'))
    code, lines = _one_line(registry_copy, "run", "vit")
    assert code == 2 and lines == [f"align: error: {registry_copy}: models.vit.inputs.pixel_values.channels: "
                                   "'channels' is not an integer of the model's config (it has None)"]


# --- align failing itself: exit 3 ----------------------------------------------------------

def test_a_failure_of_align_itself_is_exit_3_with_a_log(monkeypatch, capsys):
    from align.cli import main
    from align.diagnose import culprits

    def broken(*args, **kwargs):
        raise ZeroDivisionError("an align bug")

    monkeypatch.setattr(culprits, "deepest", broken)
    code = main(["--registry", str(REGISTRY), "run", "sisdr", "--dtype", "fp32", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1, err
    assert err[0].startswith("align: internal error in diagnose (culprits.py): ZeroDivisionError: an align bug "
                             "(the traceback is in ")
    log = err[0].split("the traceback is in ")[1].split(";")[0]
    text = open(log).read()
    assert "Traceback (most recent call last)" in text and "an align bug" in text
    assert text.startswith(f"align --registry {REGISTRY} run sisdr")


def test_port_modules_files_that_are_not_what_they_should_be_are_the_users(registry_copy, tmp_path):
    bad = tmp_path / "modules.json"
    bad.write_text('{"not": "a list"}')
    code, lines = _one_line(registry_copy, "trace", "vit", "--port-modules", str(bad))
    assert code == 2 and lines == [f"align: error: {bad}: expected a JSON list of module paths, as "
                                   "`align port-modules` writes"]
    proc = subprocess.run([sys.executable, "-m", "align", "--registry", str(registry_copy), "port-modules", "vit",
                           "--values", str(tmp_path / "none.json"), "--out", str(tmp_path / "m.json")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"align: error: {tmp_path / 'none.json'}: no such file (--values)"]


def test_the_gate_paths_failing_outputs_say_what_judged_them(monkeypatch, run_cli):
    """On the gate path nothing runs free: a failing model output is what the forced pass saw,
    and its message says teacher-forced (it said free-running)."""
    from align.report.messages import failure_messages

    mean_not_removed(monkeypatch)
    code, report, _ = run_cli("run", "sisdr", "--dtype", "fp32", "--fast")
    assert code == 1 and report["path"] == "gate"
    [output] = [m for m in failure_messages(report) if m.startswith("model output out")]
    assert "(float32, teacher-forced)" in output
    code, report, _ = run_cli("run", "sisdr", "--dtype", "fp32")
    [output] = [m for m in failure_messages(report) if m.startswith("model output out")]
    assert "(float32, free-running)" in output
