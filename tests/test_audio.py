"""The audio family's models (auraloss' losses are in test_any_model.py): openai-whisper's
Whisper against ports/audio/whisper.py. The correct port passes, the log-mel gradient and the
cross-entropy judged; broken ports fail and name the module that holds the bug."""

import fnmatch

import paddle
import pytest

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
    def wrong(self, x, xa=None, mask=None):
        source = x if xa is None else xa
        q, k, v = self.query(x), self.key(source), self.value(source)
        B, T, C = q.shape
        head = C // self.n_head

        def heads(t):
            return t.reshape([t.shape[0], t.shape[1], self.n_head, head]).transpose([0, 2, 1, 3])

        scores = paddle.matmul(heads(q), heads(k), transpose_y=True) * head**-0.25
        if mask is not None:
            scores = scores + mask[:T, :T]
        weights = paddle.nn.functional.softmax(scores, axis=-1)
        return self.out(paddle.matmul(weights, heads(v)).transpose([0, 2, 1, 3]).reshape([B, T, C]))

    mp.setattr(W.MultiHeadAttention, "forward", wrong)


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
    fd, culprits = report["first_divergence"], report["culprits"]
    detected = code == 1 and report["verdict"] == "fail"
    localized = (fd["mode"] == "teacher_forced" and fd[direction] is not None
                 and fnmatch.fnmatchcase(fd[direction], culprit)
                 and all(fnmatch.fnmatchcase(c, culprit) for c in culprits[direction]))
    bug_ledger.record(bug, "audio", detected, localized)
    assert detected and localized, (fd, culprits, report["problems"])
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
