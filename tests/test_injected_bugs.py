"""A verifier must catch bugs: each test breaks the Gemma2 port in one place (through a
test-scoped patch, never by editing the port), and asserts that the gate fails and that
the report names the module where the bug lives as the first divergence."""

import paddle
import paddle.nn.functional as F
import pytest

from ports.gemma2 import modeling as M


def rmsnorm_forward(one_plus: bool = True, eps: float | None = None):
    def forward(self, x):
        h = x.astype("float32")
        h = h * paddle.rsqrt(h.pow(2).mean(-1, keepdim=True) + (self.eps if eps is None else eps))
        w = self.weight.astype("float32")
        return (h * ((1.0 + w) if one_plus else w)).astype(x.dtype)

    return forward


def attention_without_softcap(monkeypatch):
    init = M.Gemma2Attention.__init__

    def no_cap(self, config, layer_idx):
        init(self, config, layer_idx)
        self.softcap = None

    monkeypatch.setattr(M.Gemma2Attention, "__init__", no_cap)


def final_softcap_removed(monkeypatch):
    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.lm_head(self.model(input_ids, attention_mask).last_hidden_state)
        loss = M.causal_lm_loss(logits, labels) if labels is not None else None
        return M.CausalLMOutput(loss=loss, logits=logits)

    monkeypatch.setattr(M.Gemma2ForCausalLM, "forward", forward)


def rope_base_changed(monkeypatch):
    init = M.Gemma2RotaryEmbedding.__init__

    def wrong_base(self, config):
        config = M.Gemma2Config(**{**config.__dict__, "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0}})
        init(self, config)

    monkeypatch.setattr(M.Gemma2RotaryEmbedding, "__init__", wrong_base)


def window_off_by_one(monkeypatch):
    masks = M._additive_masks
    monkeypatch.setattr(M, "_additive_masks", lambda mask, T, window, dtype: masks(mask, T, window + 1, dtype))


def exact_gelu(monkeypatch):
    init = M.Gemma2MLP.__init__

    def exact(self, config):
        init(self, config)
        self.act_fn = paddle.nn.GELU(approximate=False)

    monkeypatch.setattr(M.Gemma2MLP, "__init__", exact)


def paddle_cross_entropy_mean(monkeypatch):
    def loss(logits, labels):
        B, T, V = logits.shape
        shifted = paddle.concat([labels[:, 1:], paddle.full([B, 1], -100, dtype=labels.dtype)], axis=1)
        return F.cross_entropy(logits.reshape([-1, V]).astype("float32"), shifted.reshape([-1]),
                               ignore_index=-100, reduction="mean")

    monkeypatch.setattr(M, "causal_lm_loss", loss)


def detached_up_proj(monkeypatch):
    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x.detach()))

    monkeypatch.setattr(M.Gemma2MLP, "forward", forward)


def embedding_padding_idx_zeroed(monkeypatch):
    """paddle's own padding_idx zeroes the pad row's output, where torch returns the stored row."""

    def forward(self, input_ids):
        rows = F.embedding(input_ids, self.weight, padding_idx=self.padding_idx_torch)
        return rows * self.embed_scale.astype(self.weight.dtype)

    monkeypatch.setattr(M.Gemma2TextScaledWordEmbedding, "forward", forward)


# (bug, where it lives, which direction shows it first)
BUGS = {
    "rmsnorm_missing_plus_one": (lambda mp: mp.setattr(M.Gemma2RMSNorm, "forward", rmsnorm_forward(one_plus=False)),
                                 "model.layers.0.input_layernorm", "forward"),
    # paddle's LayerNorm default eps instead of Gemma2's 1e-6. It shows first in the first norm
    # whose input is small enough for eps to matter: the input norm sees embeddings scaled by 8.
    "rmsnorm_wrong_eps": (lambda mp: mp.setattr(M.Gemma2RMSNorm, "forward", rmsnorm_forward(eps=1e-5)),
                          "model.layers.0.post_attention_layernorm", "forward"),
    "attention_softcap_removed": (attention_without_softcap, "model.layers.0.self_attn", "forward"),
    "final_softcap_removed": (final_softcap_removed, "<root>", "forward"),
    "rope_base_changed": (rope_base_changed, "model.rotary_emb", "forward"),
    "sliding_window_off_by_one": (window_off_by_one, "model", "forward"),
    "exact_instead_of_tanh_gelu": (exact_gelu, "model.layers.0.mlp.act_fn", "forward"),
    "paddle_cross_entropy_mean": (paddle_cross_entropy_mean, "<root>", "forward"),
    "detached_gradient_path": (detached_up_proj, "model.layers.3.mlp", "backward"),
    "embedding_padding_idx_zeroed": (embedding_padding_idx_zeroed, "model.embed_tokens", "forward"),
}


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_injected_bug_fails_and_is_localized(bug, monkeypatch, run_cli):
    inject, culprit, direction = BUGS[bug]
    inject(monkeypatch)
    code, report, err = run_cli("run", "gemma2", "--dtype", "fp32")
    assert code == 1, f"{bug}: the gate passed a broken port"
    assert report["verdict"] == "fail"
    fd = report["first_divergence"]
    assert (fd["mode"], fd[direction]) == ("teacher_forced", culprit), f"{bug}: first divergence {fd}"
    assert f"{culprit}: {'forward output' if direction == 'forward' else 'gradient'} is not close!" in err
