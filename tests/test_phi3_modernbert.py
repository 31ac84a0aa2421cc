"""Phi3 and ModernBERT: the correct ports pass; architecture-specific bugs fail and are localized."""

import fnmatch

import paddle
import paddle.nn.functional as F
import pytest
from conftest import after_init

from ports.text import modernbert as MB
from ports.text import phi3 as P3


@pytest.mark.parametrize("model", ["phi3", "modernbert"])
def test_correct_port_passes_everything(model, run_cli, bug_ledger):
    code, report, _ = run_cli("run", model)
    bug_ledger.record_clean(model, false_alarm=report["verdict"] != "pass")
    assert code == 0 and report["verdict"] == "pass", report["culprits"]
    fp32 = [r for r in report["runs"] if r["dtype"] == "float32"]
    assert {r["mode"] for r in fp32} == {"teacher_forced", "free_running"}
    assert all(r["passed"] for r in fp32) and report["unpaired"] == []
    assert all(p["passed"] for p in report["param_grads"]) and all(o["passed"] for o in report["outputs"])
    assert all(w["exact"] for w in report["weights"] if w["exact"] is not None)


def test_phi3_covers_its_quirks(run_cli):
    _, report, _ = run_cli("run", "phi3", "--dtype", "fp32")
    weights = {w["source"]: w for w in report["weights"]}
    # Fused projections stay fused, transposed as a whole: (q + 2 kv) x hidden and 2 inter x hidden.
    assert weights["model.layers.0.self_attn.qkv_proj.weight"]["source_shape"] == [128, 64]
    assert weights["model.layers.0.self_attn.qkv_proj.weight"]["target_shape"] == [64, 128]
    assert weights["model.layers.0.mlp.gate_up_proj.weight"]["transform"] == "transpose"
    tf = next(r for r in report["runs"] if r["mode"] == "teacher_forced")
    assert {"model.layers.0.resid_attn_dropout", "model.layers.3.resid_mlp_dropout"} <= {layer["name"] for layer in tf["layers"]}


def test_modernbert_covers_its_quirks(run_cli):
    _, report, _ = run_cli("run", "modernbert", "--dtype", "fp32")
    tf = next(r for r in report["runs"] if r["mode"] == "teacher_forced")
    names = {layer["name"] for layer in tf["layers"]}
    # One rotary call per attention type (two thetas), and layer 0's Identity attention norm.
    assert {"model.rotary_emb", "model.rotary_emb#2", "model.layers.0.attn_norm", "head.act"} <= names
    assert next(w for w in report["weights"] if w["source"] == "decoder.weight")["transform"] == "tied"
    assert {o["name"] for o in report["outputs"]} == {"loss", "logits"}


# --- Phi3 bugs -------------------------------------------------------------------------

def phi3_qkv_split_order(mp):
    """Keys read from the value slice and values from the key slice of the fused qkv_proj."""

    def forward(self, hidden_states, position_embeddings, attention_mask=None):
        B, T = hidden_states.shape[:2]
        qkv = self.qkv_proj(hidden_states)
        q_end, kv = self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        heads = lambda t: t.reshape([B, T, -1, self.head_dim]).transpose([0, 2, 1, 3])  # noqa: E731
        q, v, k = heads(qkv[..., :q_end]), heads(qkv[..., q_end:q_end + kv]), heads(qkv[..., q_end + kv:])
        q, k = P3.apply_rotary_pos_emb(q, k, *position_embeddings)
        k = paddle.repeat_interleave(k, self.num_key_value_groups, axis=1)
        v = paddle.repeat_interleave(v, self.num_key_value_groups, axis=1)
        scores = paddle.matmul(q, k, transpose_y=True) * self.scaling + attention_mask
        weights = F.softmax(scores, axis=-1)
        return self.o_proj(paddle.matmul(weights, v).transpose([0, 2, 1, 3]).reshape([B, T, -1])), weights

    mp.setattr(P3.Phi3Attention, "forward", forward)


def phi3_full_rotary(mp):
    """partial_rotary_factor ignored: the whole head is rotated."""
    init = P3.Phi3RotaryEmbedding.__init__

    def full(self, config):
        rope = {k: v for k, v in config.rope_parameters.items() if k != "partial_rotary_factor"}
        init(self, P3.Phi3Config(**{**config.__dict__, "rope_parameters": rope}))

    mp.setattr(P3.Phi3RotaryEmbedding, "__init__", full)


def phi3_gate_up_order(mp):
    def forward(self, hidden_states):
        up, gate = self.gate_up_proj(hidden_states).chunk(2, axis=-1)  # fused order read backwards
        return self.down_proj(up * self.activation_fn(gate))

    mp.setattr(P3.Phi3MLP, "forward", forward)


def phi3_window_ignored(mp):
    mask = P3._causal_mask
    mp.setattr(P3, "_causal_mask", lambda m, T, window, dtype: mask(m, T, None, dtype))


# --- ModernBERT bugs -------------------------------------------------------------------

def modernbert_local_window_on_global_layers(mp):
    masks = MB._bidirectional_masks

    def swapped(m, T, local, dtype):
        out = masks(m, T, local, dtype)
        return {"full_attention": out["sliding_attention"], "sliding_attention": out["full_attention"]}

    mp.setattr(MB, "_bidirectional_masks", swapped)


def modernbert_geglu_on_gate(mp):
    def forward(self, hidden_states):
        x, gate = self.Wi(hidden_states).chunk(2, axis=-1)
        return self.Wo(self.drop(x * self.act(gate)))  # activation on the wrong half

    mp.setattr(MB.ModernBertMLP, "forward", forward)


def modernbert_one_rope_theta(mp):
    init = MB.ModernBertRotaryEmbedding.__init__

    def global_theta_everywhere(self, config):
        rope = dict(config.rope_parameters)
        rope["sliding_attention"] = rope["full_attention"]
        init(self, MB.ModernBertConfig(**{**config.__dict__, "rope_parameters": rope}))

    mp.setattr(MB.ModernBertRotaryEmbedding, "__init__", global_theta_everywhere)


def modernbert_causal_encoder(mp):
    masks = MB._bidirectional_masks

    def causal(m, T, local, dtype):
        q = paddle.arange(T).unsqueeze(1)
        kv = paddle.arange(T).unsqueeze(0)
        low = paddle.finfo(dtype).min
        return {k: v + paddle.where(kv <= q, 0.0, low).astype(dtype)[None, None] for k, v in masks(m, T, local, dtype).items()}

    mp.setattr(MB, "_bidirectional_masks", causal)


def modernbert_tanh_gelu_in_head(mp):
    after_init(mp, MB.ModernBertPredictionHead, lambda self, *a: setattr(self, "act", paddle.nn.GELU(approximate=True)))


# (model, bug) -> (inject, culprit glob, direction, kind)
BUGS = {
    ("phi3", "qkv_split_order"): (phi3_qkv_split_order, "model.layers.0.self_attn", "forward", "fused split"),
    ("phi3", "partial_rotary_ignored"): (phi3_full_rotary, "model.rotary_emb", "forward", "partial rotary"),
    ("phi3", "gate_up_order"): (phi3_gate_up_order, "model.layers.0.mlp", "forward", "fused split"),
    ("phi3", "sliding_window_ignored"): (phi3_window_ignored, "model", "forward", "mask"),
    ("modernbert", "local_window_on_global_layers"): (modernbert_local_window_on_global_layers, "model", "forward",
                                                      "mask"),
    ("modernbert", "geglu_activation_on_gate"): (modernbert_geglu_on_gate, "model.layers.0.mlp", "forward",
                                                 "parameter-less"),
    # Which of the two rotary calls is the local one follows the reference's set order.
    ("modernbert", "one_rope_theta_for_both"): (modernbert_one_rope_theta, "model.rotary_emb*", "forward",
                                                "parameter-less"),
    ("modernbert", "causal_mask_in_encoder"): (modernbert_causal_encoder, "model", "forward", "mask"),
    ("modernbert", "tanh_gelu_in_head"): (modernbert_tanh_gelu_in_head, "head.act", "forward", "parameter-less"),
}


@pytest.mark.parametrize("model,bug", sorted(BUGS))
def test_architecture_bug_fails_and_is_localized(model, bug, monkeypatch, run_cli, bug_ledger):
    inject, culprit, direction, kind = BUGS[(model, bug)]
    inject(monkeypatch)
    code, report, err = run_cli("run", model, "--dtype", "fp32")
    detected = code == 1 and report["verdict"] == "fail"
    fd = report["first_divergence"]
    localized = (fd["mode"] == "teacher_forced" and fd[direction] is not None
                 and fnmatch.fnmatchcase(fd[direction], culprit)
                 and any(fnmatch.fnmatchcase(c, culprit) for c in report["culprits"][direction]))
    bug_ledger.record(f"{model}:{bug}", kind, detected, localized)
    assert detected, f"{model} {bug}: the gate passed a broken port"
    assert localized, f"{model} {bug}: first divergence {fd}, culprits {report['culprits']}, expected {culprit}"


def test_paddle_layernorm_grad_bug_is_avoided():
    """Paddle 3.3.1: paddle.grad through nn.LayerNorm is wrong unless the norm's weight is
    among the requested inputs. Teacher forcing runs one plain backward instead; this pins
    both facts."""
    import numpy as np

    from align.capture.force import force
    from align.capture.paddle_side import PaddleSide
    from align.capture.trace import ROOT, Arr, Call
    from align.compare.judges import Keeper

    class Block(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.lin, self.norm = paddle.nn.Linear(8, 8), paddle.nn.LayerNorm(8)

        def forward(self, x):
            return self.norm(self.lin(x))

    paddle.seed(0)
    block = Block()
    block.norm.weight.set_value(np.linspace(0.5, 2.0, 8).astype("float32"))
    x0 = np.random.default_rng(0).normal(size=(2, 8)).astype("float32")
    g0 = np.random.default_rng(1).normal(size=(2, 8)).astype("float32")

    def grad_of_input(layer, x_np):
        x = paddle.to_tensor(x_np)
        x.stop_gradient = False
        (layer(x) * paddle.to_tensor(g0)).sum().backward()
        return x.grad.numpy()

    truth = grad_of_input(block, x0)
    x2 = paddle.to_tensor(x0)
    x2.stop_gradient = False
    raw = paddle.grad([block(x2)], [x2], [paddle.to_tensor(g0)])[0].numpy()
    assert np.abs(raw - truth).max() > 1e-3, "Paddle fixed paddle.grad through LayerNorm: the workaround can go"

    # The norm forced on the Linear's output, seeded with g0: its input gradient is exact.
    h0 = block.lin(paddle.to_tensor(x0)).numpy()
    h_grad = grad_of_input(block.norm, h0)
    out = Arr(block(paddle.to_tensor(x0)).numpy(), "float32")
    calls = {ROOT: Call(ROOT, ROOT, "Block", 0, args=(Arr(x0, "float32"),), arg_names=("x",),
                        outputs={"out": out}, grads={"out": g0}, input_grads={"x": truth}),
             "lin": Call("lin", "lin", "Linear", 1, args=(Arr(x0, "float32"),), arg_names=("input",),
                         outputs={"out": Arr(h0, "float32")}, grads={"out": h_grad}),
             "norm": Call("norm", "norm", "LayerNorm", 2, args=(Arr(h0, "float32"),), arg_names=("input",),
                          outputs={"out": out}, grads={"out": g0}, input_grads={"input": h_grad})}
    keeper = Keeper()
    force(PaddleSide(), block, {"x": paddle.to_tensor(x0)}, calls, {n: n for n in calls}, keeper, {},
          dict)
    np.testing.assert_allclose(keeper.kept["norm|grad of input input"], h_grad, rtol=1e-6, atol=1e-7)
