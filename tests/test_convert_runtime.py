"""align.convert.hf_runtime: each semantic fix shows Paddle's raw behaviour differing from torch, and
the runtime matching torch. Also the weight layout decided by layer type, with square weights."""

from pathlib import Path

import numpy as np
import paddle
import pytest
import torch

from align.convert import hf_runtime as hf

RNG = np.random.default_rng(0)


def _pd(a, grad=False):
    t = paddle.to_tensor(a)
    t.stop_gradient = not grad
    return t


def _th(a, grad=False):
    return torch.tensor(a, requires_grad=grad)


# --- cross-entropy: ignore_index's mean -----------------------------------------------------

def _ce_case():
    logits = RNG.standard_normal((8, 5)).astype(np.float32)
    labels = np.array([1, 2, -100, -100, 3, 4, -100, 0], dtype=np.int64)
    return logits, labels


def test_paddle_cross_entropy_mean_divides_by_all_tokens_and_the_runtime_by_kept_ones():
    logits, labels = _ce_case()
    t_logits = _th(logits, True)
    torch_loss = torch.nn.functional.cross_entropy(t_logits, _th(labels), ignore_index=-100)
    torch_loss.backward()

    raw = paddle.nn.functional.cross_entropy(_pd(logits), _pd(labels), ignore_index=-100, reduction="mean")
    # Paddle's mean counts the 3 ignored tokens too: 5/8 of torch's loss.
    assert abs(float(raw) - float(torch_loss)) > 0.1
    np.testing.assert_allclose(float(raw), float(torch_loss) * 5 / 8, rtol=1e-5)

    p_logits = _pd(logits, True)
    fixed = hf.cross_entropy(p_logits, _pd(labels), ignore_index=-100)
    fixed.backward()
    np.testing.assert_allclose(float(fixed), float(torch_loss), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(p_logits.grad.numpy(), t_logits.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_runtime_cross_entropy_loss_layer_and_sum_match_torch():
    logits, labels = _ce_case()
    for reduction in ("sum", "none"):
        ref = torch.nn.functional.cross_entropy(_th(logits), _th(labels), reduction=reduction).numpy()
        np.testing.assert_allclose(hf.cross_entropy(_pd(logits), _pd(labels), reduction=reduction).numpy(), ref,
                                   rtol=1e-6, atol=1e-6)
    ref = torch.nn.CrossEntropyLoss()(_th(logits), _th(labels))
    np.testing.assert_allclose(float(hf.CrossEntropyLoss()(_pd(logits), _pd(labels))), float(ref), rtol=1e-6)


def test_runtime_causal_lm_loss_matches_transformers():
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = RNG.standard_normal((2, 6, 7)).astype(np.float32)
    labels = np.array([[-100, -100, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]], dtype=np.int64)
    ref = ForCausalLMLoss(_th(logits), _th(labels), vocab_size=7)
    ours = hf.PreTrainedModel.loss_function.fget(type("XForCausalLM", (), {})())(_pd(logits), _pd(labels), 7)
    np.testing.assert_allclose(float(ours), float(ref), rtol=1e-6)


# --- type promotion -------------------------------------------------------------------------

@pytest.mark.parametrize("a_dtype,b_dtype", [("int64", "float32"), ("float32", "bool"), ("bool", "float32"),
                                             ("int32", "int64"), ("float32", "float64")])
def test_promotion_matches_torch_where_paddle_raises_or_differs(a_dtype, b_dtype):
    a = (RNG.standard_normal((3, 4)) * 3).astype(a_dtype)
    b = (RNG.standard_normal((3, 4)) * 3).astype(b_dtype)
    ref = _th(a) * _th(b)
    ours = hf.dtypes.mul(_pd(a), _pd(b))
    assert hf.result_type(_pd(a), _pd(b)) == str(ref.dtype).replace("torch.", "")
    np.testing.assert_array_equal(ours.numpy(), ref.numpy())


@pytest.mark.parametrize("a_dtype,b_dtype", [("int64", "float32"), ("float32", "bool")])
def test_paddle_refuses_mixed_int_or_bool_and_float(a_dtype, b_dtype):
    a, b = np.ones((2,), a_dtype), np.ones((2,), b_dtype)
    assert (_th(a) * _th(b)).dtype == torch.float32  # torch promotes
    with pytest.raises(TypeError, match="Type promotion"):
        _pd(a) * _pd(b)


def test_padding_mask_to_additive_matches_torch_arithmetic():
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=np.int64)
    ref = ((1 - _th(mask)) * torch.finfo(torch.float32).min)[:, None, None, :]
    np.testing.assert_array_equal(hf.masks.padding_mask_to_additive(_pd(mask)).numpy(), ref.numpy())


# --- torch attribute names and embedding semantics ------------------------------------------

def test_embedding_has_torch_names_and_returns_the_pad_row_as_stored():
    weight = RNG.standard_normal((10, 4)).astype(np.float32)
    ids = np.array([[0, 3, 0, 7]], dtype=np.int64)

    raw = paddle.nn.Embedding(10, 4, padding_idx=0)
    assert not hasattr(raw, "num_embeddings") and not hasattr(raw, "embedding_dim")
    raw.weight.set_value(weight)
    assert np.all(raw(_pd(ids)).numpy()[0, 0] == 0)  # paddle: zeros at the pad token

    ref = torch.nn.Embedding(10, 4, padding_idx=0)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(weight))
    ours = hf.Embedding(10, 4, padding_idx=0)
    ours.weight.set_value(weight)
    assert (ours.num_embeddings, ours.embedding_dim, ours.padding_idx) == \
        (ref.num_embeddings, ref.embedding_dim, ref.padding_idx)

    ref_out, our_out = ref(_th(ids)), ours(_pd(ids))
    np.testing.assert_array_equal(our_out.numpy(), ref_out.detach().numpy())
    seed = RNG.standard_normal(ref_out.shape).astype(np.float32)
    (ref_out * _th(seed)).sum().backward()
    (our_out * _pd(seed)).sum().backward()
    np.testing.assert_array_equal(ours.weight.grad.numpy(), ref.weight.grad.numpy())
    assert np.all(ours.weight.grad.numpy()[0] == 0)  # the pad row gets no gradient, as in torch


def test_conv_layers_answer_to_torch_attribute_names():
    raw = paddle.nn.Conv2D(3, 4, 3, stride=2, padding=1)
    assert not hasattr(raw, "stride") and tuple(raw._stride) == (2, 2)
    ref = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
    ours = hf.Conv2d(3, 4, 3, stride=2, padding=1)
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        assert getattr(ours, name) == getattr(ref, name), name
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    ours.weight.set_value(ref.weight.detach().numpy())
    ours.bias.set_value(ref.bias.detach().numpy())
    np.testing.assert_allclose(ours(_pd(x)).numpy(), ref(_th(x)).detach().numpy(), atol=1e-5)


# --- masks against transformers' own -----------------------------------------------------

def _mask_case(is_causal=True):
    from transformers import Gemma2Config

    cfg = Gemma2Config(attn_implementation="eager", sliding_window=3)
    mask = np.ones((2, 7), dtype=np.int64)
    mask[1, :2] = 0
    embeds = np.zeros((2, 7, 4), dtype=np.float32)
    return cfg, mask, embeds


@pytest.mark.parametrize("name", ["create_causal_mask", "create_sliding_window_causal_mask",
                                  "create_bidirectional_mask", "create_bidirectional_sliding_window_mask"])
def test_masks_equal_transformers_eager_masks(name):
    import transformers.masking_utils as mu

    cfg, mask, embeds = _mask_case()
    kwargs = {"past_key_values": None} if "causal" in name else {}
    ref = getattr(mu, name)(config=cfg, inputs_embeds=_th(embeds), attention_mask=_th(mask), **kwargs)
    ours = getattr(hf, name)(config=cfg, inputs_embeds=_pd(embeds), attention_mask=_pd(mask), **kwargs)
    np.testing.assert_array_equal(ours.numpy(), ref.numpy())
    assert ours.numpy().min() < -1e38 and ours.numpy().max() == 0  # both kinds of entry are exercised


def test_sdpa_and_eager_attention_agree_and_match_torch():
    q, k, v = (RNG.standard_normal((2, 4, 5, 8)).astype(np.float32) for _ in range(3))
    mask = np.where(np.tril(np.ones((5, 5), bool)), 0.0, np.finfo(np.float32).min).astype(np.float32)[None, None]
    module = type("Attn", (), {"num_key_value_groups": 1, "is_causal": True, "training": False})()
    out, _ = hf.ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", None)(module, _pd(q), _pd(k), _pd(v), _pd(mask),
                                                                    scaling=0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(_th(q), _th(k), _th(v), attn_mask=_th(mask), scale=0.3)
    np.testing.assert_allclose(out.numpy(), ref.transpose(1, 2).numpy(), atol=2e-6)
    with pytest.raises(NotImplementedError, match="flash"):
        hf.ALL_ATTENTION_FUNCTIONS.get_interface("flash_attention_2", None)


# --- the weight layout is decided by the port layer's type -----------------------------------

def test_compat_linear_keeps_torch_layout_and_nn_linear_is_transposed_even_when_square():
    from align import weights as W

    class OwnLinear(paddle.nn.Linear):  # a port's own subclass (PaddleSpeech's): its base's layout
        pass

    class Port(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.compat = paddle.compat.nn.Linear(6, 6, bias=False)
            self.plain = paddle.nn.Linear(6, 6, bias_attr=False)
            self.own = OwnLinear(6, 6, bias_attr=False)

    port = Port()
    ref = {"compat.weight": RNG.standard_normal((6, 6)).astype(np.float32),
           "plain.weight": RNG.standard_normal((6, 6)).astype(np.float32),
           "own.weight": RNG.standard_normal((6, 6)).astype(np.float32)}
    rules = W.Rules(source=Path("inline.toml"), renames=(), tie={}, ignore=())
    slots = W.describe_slots(port.state_dict(), dict(port.named_sublayers(include_self=True)))
    wmap = W.plan(rules, {k: v.shape for k, v in ref.items()}, slots)
    transforms = {e.source: e.transform for e in wmap.entries}
    assert transforms == {"compat.weight": "copy", "plain.weight": "transpose", "own.weight": "transpose"}
    for key, arr in W.convert(wmap, ref).items():
        port.state_dict()[key].set_value(arr)
    x = RNG.standard_normal((3, 6)).astype(np.float32)
    for name in ("compat", "plain", "own"):
        torch_linear = torch.nn.Linear(6, 6, bias=False)
        with torch.no_grad():
            torch_linear.weight.copy_(torch.from_numpy(ref[f"{name}.weight"]))
        expected = torch_linear(_th(x)).detach().numpy()
        np.testing.assert_allclose(getattr(port, name)(_pd(x)).numpy(), expected, atol=1e-5)
    # The square shape fits the other way too: loaded untransposed, the output is wrong.
    port.plain.weight.set_value(ref["plain.weight"])
    assert np.abs(port.plain(_pd(x)).numpy() - expected).max() > 1e-2


def test_tie_weights_shares_one_tensor():
    class Cfg:
        tie_word_embeddings = True
        initializer_range = 0.02
        _attn_implementation = "eager"

    class TinyForCausalLM(hf.PreTrainedModel):
        _tied_weights_keys = {"lm_head.weight": "embed.weight"}

        def __init__(self, config):
            super().__init__(config)
            self.embed = hf.Embedding(11, 4)
            self.lm_head = paddle.compat.nn.Linear(4, 11, bias=False)
            self.post_init()

    model = TinyForCausalLM(Cfg())
    assert model.lm_head.weight is model.embed.weight
    state = model.state_dict()
    assert set(state) == {"embed.weight", "lm_head.weight"} and state["embed.weight"] is state["lm_head.weight"]
