"""The weight mapper: transposes follow the port layer's type, never the shapes; strict by default."""

import numpy as np
import pytest

from align.spec import ConfigError
from align.weights import PortSlot, WeightError, convert, load_rules, plan, verify

LINEAR = ("paddle.nn.layer.common", "Linear")  # stores [in, out]
COMPAT_LINEAR = ("paddle.compat.nn", "Linear")  # stores [out, in], as torch
EMBEDDING = ("paddle.nn.layer.common", "Embedding")


def rules_file(tmp_path, text=""):
    path = tmp_path / "rules.toml"
    path.write_text(text)
    return load_rules(path)


def square_source():
    rng = np.random.default_rng(0)
    return {"q.weight": rng.normal(size=(4, 4)).astype(np.float32)}


def test_square_weight_is_transposed_for_paddle_linear_only(tmp_path):
    rules, src = rules_file(tmp_path), square_source()
    paddle_layer = plan(rules, src, {"q.weight": PortSlot((4, 4), LINEAR, "weight")})
    compat_layer = plan(rules, src, {"q.weight": PortSlot((4, 4), COMPAT_LINEAR, "weight")})
    assert paddle_layer.entries[0].transform == "transpose"
    assert compat_layer.entries[0].transform == "copy"
    np.testing.assert_array_equal(convert(paddle_layer, src)["q.weight"], src["q.weight"].T)
    np.testing.assert_array_equal(convert(compat_layer, src)["q.weight"], src["q.weight"])


def test_rename_with_captures(tmp_path):
    rules = rules_file(tmp_path, '[[rename]]\nfrom = "encoder\\\\.layer\\\\.(\\\\d+)\\\\.(.*)"\nto = "layers.\\\\1.\\\\2"\n')
    src = {"encoder.layer.3.norm.weight": np.ones(2, np.float32)}
    wmap = plan(rules, src, {"layers.3.norm.weight": PortSlot((2,), EMBEDDING, "weight")})
    assert wmap.entries[0].target == "layers.3.norm.weight"
    assert "rename" in wmap.entries[0].rule


def test_unmapped_source_key_is_named(tmp_path):
    with pytest.raises(WeightError, match=r"^extra\.bias: unmapped reference tensor"):
        plan(rules_file(tmp_path), {"extra.bias": np.zeros(2, np.float32)}, {})


def test_unwritten_port_tensor_is_named(tmp_path):
    with pytest.raises(WeightError, match=r"never written by rules\.toml: lonely\.weight"):
        plan(rules_file(tmp_path), {}, {"lonely.weight": PortSlot((2,), EMBEDDING, "weight")})


def test_shape_mismatch_names_both_shapes(tmp_path):
    src = {"w.weight": np.zeros((3, 5), np.float32)}
    with pytest.raises(WeightError, match=r"reference \(3, 5\) gives \(5, 3\), port expects \(3, 5\)"):
        plan(rules_file(tmp_path), src, {"w.weight": PortSlot((3, 5), LINEAR, "weight")})


def test_ignore_rule(tmp_path):
    rules = rules_file(tmp_path, 'ignore = ["rotary\\\\..*"]\n')
    wmap = plan(rules, {"rotary.inv_freq": np.zeros(2, np.float32)}, {})
    assert wmap.entries[0].transform == "ignored" and wmap.entries[0].target is None


def test_tie_requires_identical_reference_tensors(tmp_path):
    rules = rules_file(tmp_path, '[tie]\n"head.weight" = "emb.weight"\n')
    emb = np.arange(6, dtype=np.float32).reshape(3, 2)
    slots = {"emb.weight": PortSlot((3, 2), EMBEDDING, "weight"),
             "head.weight": PortSlot((3, 2), COMPAT_LINEAR, "weight", alias_of="emb.weight")}
    wmap = plan(rules, {"emb.weight": emb, "head.weight": emb.copy()}, slots)
    assert [e.transform for e in wmap.entries] == ["copy", "tied"]
    with pytest.raises(WeightError, match="tied to 'emb.weight'.*differ"):
        plan(rules, {"emb.weight": emb, "head.weight": emb + 1}, slots)


def test_port_tie_without_rule_is_refused(tmp_path):
    emb = np.zeros((3, 2), np.float32)
    slots = {"emb.weight": PortSlot((3, 2), EMBEDDING, "weight"),
             "head.weight": PortSlot((3, 2), COMPAT_LINEAR, "weight", alias_of="emb.weight")}
    with pytest.raises(WeightError, match="shares this tensor with 'emb.weight'"):
        plan(rules_file(tmp_path), {"emb.weight": emb, "head.weight": emb}, slots)


def test_verify_is_bit_exact(tmp_path):
    src = square_source()
    wmap = plan(rules_file(tmp_path), src, {"q.weight": PortSlot((4, 4), LINEAR, "weight")})
    ok = verify(wmap, src, lambda k: src["q.weight"].T.copy())
    assert ok.all_exact
    one_ulp = np.nextafter(src["q.weight"].T, np.float32(np.inf))
    with pytest.raises(WeightError, match="differ from their source: q.weight -> q.weight"):
        verify(wmap, src, lambda k: one_ulp)


def test_to_reference_undoes_the_transpose(tmp_path):
    src = square_source()
    wmap = plan(rules_file(tmp_path), src, {"q.weight": PortSlot((4, 4), LINEAR, "weight")})
    key, back = wmap.to_reference("q.weight", src["q.weight"].T)
    assert key == "q.weight"
    np.testing.assert_array_equal(back, src["q.weight"])


@pytest.mark.parametrize("text,key", [
    ("transpose = true\n", "transpose"),
    ('[[rename]]\nfrom = "("\nto = "x"\n', "rename[0].from"),
    ('[[rename]]\nfrom = "a"\n', "rename[0]"),
])
def test_bad_rules_file(tmp_path, text, key):
    with pytest.raises(ConfigError) as e:
        rules_file(tmp_path, text)
    assert e.value.key == key
