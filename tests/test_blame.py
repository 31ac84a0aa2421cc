"""Blame the code that is wrong: a port that skips a child's call is its caller's fault; a
child skipped that did nothing here (a dropout in eval) is a note; a gradient changed where a
tensor crosses a module boundary (a hook, a custom autograd function, a detach) is seen by the
teacher-forced backward, in the module whose code holds the boundary."""

import fnmatch

import paddle
import pytest

from ports.text import gemma2 as G
from ports.text import phi3 as P


def _gemma2_layer(attn_norm=True, change_mlp_out=None):
    """Gemma2's decoder layer, with its input norm's call left out or its MLP's output altered
    as the layer hands it on (that is, in the layer's own code)."""

    def forward(self, hidden_states, position_embeddings, attention_mask=None):
        residual = hidden_states
        x = self.input_layernorm(hidden_states) if attn_norm else hidden_states
        h, _ = self.self_attn(x, position_embeddings, attention_mask)
        hidden_states = residual + self.post_attention_layernorm(h)
        residual = hidden_states
        h = self.mlp(self.pre_feedforward_layernorm(hidden_states))
        if change_mlp_out is not None:
            h = change_mlp_out(h)
        return residual + self.post_feedforward_layernorm(h)

    return forward


def _without_final_norm(self, input_ids, attention_mask=None, position_ids=None):
    hidden_states = self.embed_tokens(input_ids)
    T = input_ids.shape[1]
    position_ids = paddle.arange(T, dtype="int64").unsqueeze(0) if position_ids is None else position_ids
    masks = G._additive_masks(attention_mask, T, self.config.sliding_window, hidden_states.dtype)
    position_embeddings = self.rotary_emb(hidden_states, position_ids)
    for layer, layer_type in zip(self.layers, self.config.layer_types):
        hidden_states = layer(hidden_states, position_embeddings, masks[layer_type])
    return G.BaseModelOutput(last_hidden_state=hidden_states)  # self.norm left out


class HalfBackward(paddle.autograd.PyLayer):
    """Identity forward, half the gradient backward: a custom autograd function at a boundary."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * 0.5


def _hooked(h):
    h.register_hook(lambda g: g * 2.0)  # a tensor hook on the MLP's output, in the layer's code
    return h


SKIPPED = {
    # bug -> (the forward to install, the module whose code is wrong, the child it did not call)
    "input_layernorm_not_called": ((G.Gemma2DecoderLayer, _gemma2_layer(attn_norm=False)),
                                   "model.layers.*", "model.layers.*.input_layernorm"),
    "final_norm_not_called": ((G.Gemma2Model, _without_final_norm), "model", "model.norm"),
}

BOUNDARY = {
    "tensor_hook_on_mlp_output": _hooked,
    "custom_autograd_on_mlp_output": HalfBackward.apply,
    "detach_on_mlp_output": lambda h: h.detach(),
}


def _args(config):
    return ("--dtype", "fp32", *(("--config", "mid", "--fast") if config == "mid" else ()))


@pytest.mark.parametrize("config", ["tiny", "mid"])
@pytest.mark.parametrize("bug", sorted(SKIPPED))
def test_a_skipped_call_blames_the_caller_and_names_the_child(bug, config, monkeypatch, run_cli, bug_ledger):
    (cls, forward), caller, child = SKIPPED[bug]
    monkeypatch.setattr(cls, "forward", forward)
    code, report, err = run_cli("run", "gemma2", *_args(config))
    culprits, fd = report["culprits"], report["first_divergence"]
    detected = code == 1 and report["verdict"] == "fail"
    localized = (bool(culprits["forward"]) and all(fnmatch.fnmatchcase(c, caller) for c in culprits["forward"])
                 and fnmatch.fnmatchcase(fd["forward"] or "", caller))
    bug_ledger.record(bug, "skipped call", detected, localized, config)
    assert detected and localized, (culprits, fd)
    for c in culprits["forward"]:
        [skipped] = culprits["uncalled"][c]
        assert fnmatch.fnmatchcase(skipped, child) and skipped.startswith(c + ".")
        assert f"{c} (did not call {skipped})" in err or config == "mid"  # the console line (--quiet keeps it)
    assert f"It never called {culprits['uncalled'][fd['forward']][0]}, which the reference's calls" in err
    tf = report["runs"][0]
    never = [layer for layer in tf["layers"] if not layer["called"]]
    assert never and all(not layer["passed"] and fnmatch.fnmatchcase(layer["name"], child) for layer in never)


def test_a_skipped_no_op_is_a_note_not_a_failure(monkeypatch, run_cli, bug_ledger):
    """Phi3's residual dropouts do nothing in eval: a port that never calls them computes the
    same thing, and passes, saying so."""

    def forward(self, hidden_states, position_embeddings, attention_mask=None):
        h, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask)
        hidden_states = hidden_states + h
        h = self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states + h

    monkeypatch.setattr(P.Phi3DecoderLayer, "forward", forward)
    code, report, _ = run_cli("run", "phi3", "--dtype", "fp32")
    bug_ledger.record_clean("phi3 without its dropouts' calls", false_alarm=code != 0)
    assert code == 0 and report["verdict"] == "pass", report["problems"]
    for run in (r for r in report["runs"] if r["status"] == "ran"):
        never = [layer for layer in run["layers"] if not layer["called"]]
        assert {layer["name"].rsplit(".", 1)[1] for layer in never} == {"resid_attn_dropout", "resid_mlp_dropout"}
        for layer in never:
            parent = layer["name"].rsplit(".", 1)[0]
            assert layer["passed"] and layer["forward"]["note"].startswith(
                f"the port never called this module: {parent} passes forward and backward without it")


def test_a_skipped_call_that_matters_still_fails_in_the_child_too(monkeypatch, run_cli):
    """The verdict never hides the uncalled child: it fails (not excused), it is just no culprit."""
    monkeypatch.setattr(G.Gemma2DecoderLayer, "forward", _gemma2_layer(attn_norm=False))
    _, report, _ = run_cli("run", "gemma2", "--dtype", "fp32", "--fast")
    layer = next(layer for layer in report["runs"][0]["layers"] if layer["name"] == "model.layers.0.input_layernorm")
    assert not layer["passed"] and layer["forward"]["note"] == "the port never called this module"
    assert "model.layers.0.input_layernorm" not in report["culprits"]["forward"]


@pytest.mark.parametrize("config", ["tiny", "mid"])
@pytest.mark.parametrize("bug", sorted(BOUNDARY))
def test_a_gradient_changed_at_a_boundary_is_seen_teacher_forced(bug, config, monkeypatch, run_cli, bug_ledger):
    """The MLP's output gradient changed as the layer hands the output on: the MLP and its
    consumer are right, the layer's code is not. Named by the teacher-forced backward."""
    monkeypatch.setattr(G.Gemma2DecoderLayer, "forward", _gemma2_layer(change_mlp_out=BOUNDARY[bug]))
    code, report, err = run_cli("run", "gemma2", *_args(config))
    culprits, fd = report["culprits"], report["first_divergence"]
    detected = code == 1 and report["verdict"] == "fail"
    localized = (fd["mode"] == "teacher_forced" and culprits["forward"] == []
                 and bool(culprits["backward"]) and all(fnmatch.fnmatchcase(c, "model.layers.?") for c in culprits["backward"]))
    bug_ledger.record(bug, "gradient at a boundary", detected, localized, config)
    assert detected and localized, (culprits, fd)
    layer = next(layer for layer in report["runs"][0]["layers"] if layer["name"] == fd["backward"])
    assert layer["forward"]["passed"] and not layer["backward"]["passed"]
    # where: the boundary the gradient crossed, the MLP's output as the layer received it, or
    # the same tensor as the layer hands it to the next norm
    worst = layer["backward"]["worst"]
    assert worst.startswith((f"grad of {fd['backward']}.mlp output",
                             f"{fd['backward']}.post_feedforward_layernorm input")), worst
    assert worst in err
    assert f"{fd['backward']}: gradient is not close!" in err
