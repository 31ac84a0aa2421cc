"""The audio family's models (auraloss' losses are in test_any_model.py): openai-whisper's
Whisper against ports/audio/whisper.py. The correct port passes, the log-mel gradient and the
cross-entropy judged; broken ports fail and name the module that holds the bug. And
PaddleSpeech 1.5.0's own Whisper as it is, in its own environment (.venv-paddlespeech)."""

import paddle
import pytest
from conftest import ROOT, after_init, localized_to

from ports.audio import whisper as W


def test_whisper_passes_with_its_loss_and_mel_gradient(run_cli, bug_ledger):
    code, report, _ = run_cli("run", "whisper", "--dtype", "fp32")
    bug_ledger.record_clean("whisper", false_alarm=report["verdict"] != "pass")
    assert code == 0 and report["verdict"] == "pass", report["problems"]
    assert [o["name"] for o in report["outputs"]] == ["logits", "loss"]
    assert [g["name"] for g in report["input_grads"]] == ["input:mel"] and report["input_grads"][0]["passed"]
    forced = next(r for r in report["runs"] if r["mode"] == "teacher_forced")
    names = {layer["name"] for layer in forced["layers"]}
    assert {"decoder.blocks.1.cross_attn", "encoder.conv2", "decoder.blocks.0.attn"} <= names
    # every parameter, the tied token embedding among them (the logits' projection and the lookup)
    assert len(report["param_grads"]) == 88 and all(p["passed"] for p in report["param_grads"])


# --- broken ports -------------------------------------------------------------------------------

def attention_scaled_once(mp):
    """head ** -0.25 where the reference scales q and k by it each: the product is off."""
    after_init(mp, W.MultiHeadAttention, lambda self, n_state, n_head: setattr(self, "scale", (n_state // n_head) ** -0.25))


def cross_attention_on_itself(mp):
    """The decoder's cross-attention attends to the text instead of the audio."""
    forward = W.MultiHeadAttention.forward
    mp.setattr(W.MultiHeadAttention, "forward", lambda self, x, xa=None, mask=None: forward(self, x, None, mask))


def mask_not_causal(mp):
    """The decoder's mask built without its upper triangle: every token sees the future."""
    init = W.TextDecoder.__init__

    def without(self, n_vocab, n_ctx, n_state, n_head, n_layer):
        init(self, n_vocab, n_ctx, n_state, n_head, n_layer)
        self.mask.set_value(paddle.zeros([n_ctx, n_ctx]))

    mp.setattr(W.TextDecoder, "__init__", without)


def labels_not_shifted(mp):
    """Each token's logits scored against itself, not the next token."""
    forward = W.Whisper.forward

    def unshifted(self, mel, tokens, labels=None):
        logits = self.decoder(tokens, self.encoder(mel))
        loss = paddle.nn.functional.cross_entropy(logits.reshape([-1, logits.shape[-1]]), labels.reshape([-1]))
        return W.WhisperOutput(logits, loss)

    assert forward is not unshifted
    mp.setattr(W.Whisper, "forward", unshifted)


def mel_gradient_cut(mp):
    """The spectrogram detached before the first convolution: the encoder sends nothing back."""
    forward = W.AudioEncoder.forward
    mp.setattr(W.AudioEncoder, "forward", lambda self, x: forward(self, x.detach()))


BUGS = {  # name: (inject, culprit glob, direction)
    "whisper:attention_scaled_once": (attention_scaled_once, "*coder.blocks.*.*attn", "forward"),
    "whisper:cross_attention_on_itself": (cross_attention_on_itself, "decoder.blocks.*.cross_attn", "forward"),
    "whisper:mask_not_causal": (mask_not_causal, "decoder", "forward"),
    "whisper:labels_not_shifted": (labels_not_shifted, "<root>", "forward"),
    "whisper:mel_gradient_cut": (mel_gradient_cut, "encoder", "backward"),
}


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_broken_port_fails_and_is_localized(bug, monkeypatch, run_cli, bug_ledger):
    inject, culprit, direction = BUGS[bug]
    inject(monkeypatch)
    code, report, err = run_cli("run", "whisper", "--dtype", "fp32")
    detected, localized = localized_to(code, report, culprit, direction)
    bug_ledger.record(bug, "audio", detected, localized)
    assert detected and localized, (report["first_divergence"], report["culprits"], report["problems"])
    assert "Traceback" not in err


def test_a_reference_parameter_left_uninitialised_is_the_users(monkeypatch, run_cli):
    """openai-whisper makes the decoder's positions with torch.empty, for a checkpoint to fill:
    memory that holds NaN once a process has run a while. A reference whose own init leaves a
    parameter not finite is refused, naming it (reference.audio:whisper zeroes that one)."""
    import torch

    from reference import audio

    build = audio.whisper

    def uninitialised(**dims):
        model = build(**dims)
        with torch.no_grad():
            model.decoder.positional_embedding.fill_(float("nan"))
        return model

    monkeypatch.setattr(audio, "whisper", uninitialised)
    code, report, err = run_cli("run", "whisper", "--dtype", "fp32")
    assert code == 2 and report is None
    assert "parameter decoder.positional_embedding is not finite after reference.audio:whisper's own" in err


# --- PaddleSpeech's Whisper, as it is ------------------------------------------------------------

PS_PYTHON = ROOT / ".venv-paddlespeech" / "bin" / "python"
needs_paddlespeech = pytest.mark.skipif(
    not PS_PYTHON.is_file(),
    reason="no .venv-paddlespeech: `make venv-paddlespeech` creates it (.ci/run does); paddlespeech 1.5.0 "
           "cannot share this environment's numpy 2",
)


@needs_paddlespeech
def test_paddlespeech_whisper_matches_openai_whisper(run_cli, tmp_path, monkeypatch):
    """PaddleSpeech 1.5.0's Whisper keeps openai-whisper's names: no weight rule, its Linear
    subclasses transposed by their base's type, every module paired, forward and backward.
    Its logger's exp/log/ goes to the port process's scratch directory, not the user's."""
    here = tmp_path / "user"
    here.mkdir()
    monkeypatch.chdir(here)
    code, report, _ = run_cli("run", "ps-whisper", "--dtype", "fp32")
    assert list(here.iterdir()) == []
    assert code == 0 and report["verdict"] == "pass", report["problems"]
    assert not report["env"]["same_environment"]
    assert {w["rule"] for w in report["weights"]} == {"same name"}
    linear = [w for w in report["weights"] if len(w["source_shape"]) == 2 and "embedding" not in w["source"]]
    assert linear and all(w["transform"] == "transpose" for w in linear)  # every Linear weight, by its base type
    assert not [u for u in report["unpaired"] if not u["allowed"]]


@needs_paddlespeech
def test_paddlespeech_whisper_masks_n_ctx_by_n_state(run_cli):
    """Its decoder builds the causal mask n_text_ctx x n_text_state (openai-whisper's is
    n_ctx x n_ctx): a text longer than the model is wide breaks the first self-attention, as a
    whole-sequence pass of whisper tiny (width 384, context 448) over more than 384 tokens would."""
    code, report, _ = run_cli("run", "ps-whisper", "--dtype", "fp32", "--config", "narrow")
    assert code == 1
    assert report["culprits"]["forward"] == ["decoder.blocks.0.attn"]
    forced = next(r for r in report["runs"] if r["mode"] == "teacher_forced")
    attn = next(layer for layer in forced["layers"] if layer["name"] == "decoder.blocks.0.attn")
    assert attn["forward"]["note"].startswith("the port raised ValueError") and "[12, 8]" in attn["forward"]["note"]


def test_whispers_float64_truth_runs_through_its_float32_casts():
    """openai-whisper's LayerNorm casts to float32 whatever the model's dtype. With float64 =
    "through-casts" its float64 copy stays in float64 there: held to 1e-7, below fp32's own
    rounding, the correct port fails the literal rule and the truth lets it pass, each rescued
    comparison within 2x the reference's own error. A plain float64 copy raises, and that is the
    registry entry's to fix: one line naming the module and the two settings."""
    import dataclasses

    from conftest import REGISTRY

    from align.core.port import align_model
    from align.errors import ConfigError
    from align.registry.load import load_registry
    from align.registry.spec import NoiseFloor, Tolerance

    spec = load_registry(REGISTRY).get("whisper")
    assert spec.noise_floor.through_casts
    tight = dataclasses.replace(spec, tolerance=Tolerance(1e-7, 1e-7))
    report = align_model(tight, fast=True).to_dict()
    assert report["verdict"] == "pass" and report["judged_by"]["literal"]["met"] is False
    rescued = [m for layer in report["runs"][0]["layers"] for m in (layer["forward"], layer["backward"])
               if m and m["rule"] == "floor"]
    assert rescued and all(m["truth_error"] <= 2.0 * m["reference_error"] + 1e-6 for m in rescued)
    with pytest.raises(ConfigError, match=r"models\.whisper\.tolerance\.float64: a float64 copy of the reference "
                                          r"raised in module encoder\.blocks\.0\.attn_ln: RuntimeError: mixed dtype"):
        align_model(dataclasses.replace(tight, noise_floor=NoiseFloor(2.0)), fast=True)
