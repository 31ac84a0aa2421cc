"""The weight mapper: transposes follow the port layer's type, never the shapes; strict by default."""

import numpy as np
import pytest

from align.errors import ConfigError, WeightError
from align.weights import (
    PortSlot,
    build_sources,
    build_targets,
    convert,
    load_rules,
    merge_parts,
    plan,
    render_rules,
    same_bytes,
    split_parts,
    verify,
)

LINEAR = ("paddle.nn.layer.common", "Linear")  # stores [in, out]
COMPAT_LINEAR = ("paddle.compat.nn", "Linear")  # stores [out, in], as torch
EMBEDDING = ("paddle.nn.layer.common", "Embedding")


def rules_file(tmp_path, text=""):
    path = tmp_path / "rules.toml"
    path.write_text(text)
    return load_rules(path)


def shapes(arrays):
    return {k: v.shape for k, v in arrays.items()}


def square_source():
    rng = np.random.default_rng(0)
    return {"q.weight": rng.normal(size=(4, 4)).astype(np.float32)}


def test_square_weight_is_transposed_for_paddle_linear_only(tmp_path):
    rules, src = rules_file(tmp_path), square_source()
    paddle_layer = plan(rules, shapes(src), {"q.weight": PortSlot((4, 4), LINEAR, "weight")})
    compat_layer = plan(rules, shapes(src), {"q.weight": PortSlot((4, 4), COMPAT_LINEAR, "weight")})
    assert paddle_layer.entries[0].transform == "transpose"
    assert compat_layer.entries[0].transform == "copy"
    np.testing.assert_array_equal(convert(paddle_layer, src)["q.weight"], src["q.weight"].T)
    np.testing.assert_array_equal(convert(compat_layer, src)["q.weight"], src["q.weight"])


def test_transpose_override_by_name(tmp_path):
    rules = rules_file(tmp_path, "[transpose]\n'q\\.weight' = false\n")
    wmap = plan(rules, {"q.weight": (4, 4)}, {"q.weight": PortSlot((4, 4), LINEAR, "weight")})
    assert wmap.entries[0].transform == "copy" and "transpose 'q\\\\.weight' = false" in wmap.entries[0].rule


def test_rename_with_captures(tmp_path):
    rules = rules_file(tmp_path, '[[rename]]\nfrom = "encoder\\\\.layer\\\\.(\\\\d+)\\\\.(.*)"\nto = "layers.\\\\1.\\\\2"\n')
    wmap = plan(rules, {"encoder.layer.3.norm.weight": (2,)}, {"layers.3.norm.weight": PortSlot((2,), EMBEDDING, "weight")})
    assert wmap.entries[0].target == "layers.3.norm.weight"
    assert "rename" in wmap.entries[0].rule


def test_unmapped_source_key_is_named(tmp_path):
    with pytest.raises(WeightError, match=r"^extra\.bias: unmapped reference tensor"):
        plan(rules_file(tmp_path), {"extra.bias": (2,)}, {})


def test_unwritten_port_tensor_is_named(tmp_path):
    with pytest.raises(WeightError, match=r"never written by rules\.toml: lonely\.weight"):
        plan(rules_file(tmp_path), {}, {"lonely.weight": PortSlot((2,), EMBEDDING, "weight")})


def test_non_strict_plan_lists_every_problem(tmp_path):
    wmap = plan(rules_file(tmp_path), {"a.weight": (2,), "b.weight": (2,)},
                {"a.weight": PortSlot((2,), EMBEDDING, "weight"), "c.weight": PortSlot((2,), EMBEDDING, "weight")},
                strict=False)
    assert wmap.unmapped == ("b.weight",) and wmap.unwritten == ("c.weight",)


def test_shape_mismatch_names_both_shapes(tmp_path):
    with pytest.raises(WeightError, match=r"reference \(3, 5\) gives \(5, 3\), port expects \(3, 5\)"):
        plan(rules_file(tmp_path), {"w.weight": (3, 5)}, {"w.weight": PortSlot((3, 5), LINEAR, "weight")})


def test_duplicate_target_is_named(tmp_path):
    rules = rules_file(tmp_path, '[[rename]]\nfrom = "[ab]\\\\.weight"\nto = "x.weight"\n')
    with pytest.raises(WeightError, match=r"x\.weight: written twice, from 'a\.weight' and 'b\.weight'"):
        plan(rules, {"a.weight": (2,), "b.weight": (2,)}, {"x.weight": PortSlot((2,), EMBEDDING, "weight")})


def test_ignore_rule(tmp_path):
    wmap = plan(rules_file(tmp_path, 'ignore = ["rotary\\\\..*"]\n'), {"rotary.inv_freq": (2,)}, {})
    assert wmap.entries[0].transform == "ignored" and wmap.entries[0].target is None


def test_tie_requires_identical_reference_tensors(tmp_path):
    rules = rules_file(tmp_path, '[tie]\n"head.weight" = "emb.weight"\n')
    emb = np.arange(6, dtype=np.float32).reshape(3, 2)
    slots = {"emb.weight": PortSlot((3, 2), EMBEDDING, "weight"),
             "head.weight": PortSlot((3, 2), COMPAT_LINEAR, "weight", alias_of="emb.weight")}
    src = {"emb.weight": emb, "head.weight": emb.copy()}
    wmap = plan(rules, shapes(src), slots, same=lambda a, b: same_bytes(src[a], src[b]))
    assert [e.transform for e in wmap.entries] == ["copy", "tied"]
    bad = {"emb.weight": emb, "head.weight": emb + 1}
    with pytest.raises(WeightError, match="tied to 'emb.weight'.*differ"):
        plan(rules, shapes(bad), slots, same=lambda a, b: same_bytes(bad[a], bad[b]))


def test_port_tie_without_rule_is_refused(tmp_path):
    slots = {"emb.weight": PortSlot((3, 2), EMBEDDING, "weight"),
             "head.weight": PortSlot((3, 2), COMPAT_LINEAR, "weight", alias_of="emb.weight")}
    with pytest.raises(WeightError, match="shares this tensor with 'emb.weight'"):
        plan(rules_file(tmp_path), {"emb.weight": (3, 2), "head.weight": (3, 2)}, slots)


def test_verify_is_bit_exact(tmp_path):
    src = square_source()
    wmap = plan(rules_file(tmp_path), shapes(src), {"q.weight": PortSlot((4, 4), LINEAR, "weight")})
    assert verify(wmap, src, lambda k: src["q.weight"].T.copy()).all_exact
    one_ulp = np.nextafter(src["q.weight"].T, np.float32(np.inf))
    with pytest.raises(WeightError, match="differ from their source: q.weight -> q.weight"):
        verify(wmap, src, lambda k: one_ulp)


def test_to_reference_undoes_the_transpose(tmp_path):
    src = square_source()
    wmap = plan(rules_file(tmp_path), shapes(src), {"q.weight": PortSlot((4, 4), LINEAR, "weight")})
    back, left = wmap.to_reference({"q.weight": src["q.weight"].T, "extra": src["q.weight"]})
    assert list(back) == ["q.weight"] and left == ["extra"]
    np.testing.assert_array_equal(back["q.weight"], src["q.weight"])


QKV_MERGE = '''
[[merge]]
from = ["l\\\\.(\\\\d+)\\\\.q\\\\.weight", "l\\\\.(\\\\d+)\\\\.k\\\\.weight", "l\\\\.(\\\\d+)\\\\.v\\\\.weight"]
to = "l.\\\\1.qkv.weight"
axis = 0
groups = "num_key_value_heads"
'''


def qkv_source(nh=4, nkv=2, hd=3, hidden=5):
    rng = np.random.default_rng(1)
    return {"l.0.q.weight": rng.normal(size=(nh * hd, hidden)).astype(np.float32),
            "l.0.k.weight": rng.normal(size=(nkv * hd, hidden)).astype(np.float32),
            "l.0.v.weight": rng.normal(size=(nkv * hd, hidden)).astype(np.float32)}


def test_grouped_qkv_merge_is_laid_out_per_kv_head(tmp_path):
    """Per KV head g: [the q heads it serves | its k head | its v head], as some Paddle ports fuse."""
    src = qkv_source()
    wmap = plan(rules_file(tmp_path, QKV_MERGE), shapes(src), {"l.0.qkv.weight": PortSlot((5, 24), LINEAR, "weight")},
                config={"num_key_value_heads": 2})
    [e] = wmap.entries
    assert e.transform == "merge" and e.groups == 2 and e.transposed
    fused = convert(wmap, src)["l.0.qkv.weight"].T  # back to [out, in] to read the layout
    q, k, v = src["l.0.q.weight"], src["l.0.k.weight"], src["l.0.v.weight"]
    expected = np.concatenate([q[0:6], k[0:3], v[0:3], q[6:12], k[3:6], v[3:6]])
    np.testing.assert_array_equal(fused, expected)
    # The inverse gives back the very bytes, and gradients of the fused tensor come back as parts.
    back = build_sources(e, lambda t: convert(wmap, src)[t])
    assert all(same_bytes(back[k], src[k]) for k in src)
    parts, _ = wmap.to_reference({"l.0.qkv.weight": fused.T.copy()})
    assert all(same_bytes(parts[k], src[k]) for k in src)


def test_split_is_the_inverse_of_merge(tmp_path):
    rules = rules_file(tmp_path, '''
[[split]]
from = "l\\\\.(\\\\d+)\\\\.gate_up\\\\.weight"
to = ["l.\\\\1.gate.weight", "l.\\\\1.up.weight"]
axis = 0
''')
    fused = np.arange(40, dtype=np.float32).reshape(8, 5)
    slots = {"l.0.gate.weight": PortSlot((4, 5), COMPAT_LINEAR, "weight"),
             "l.0.up.weight": PortSlot((4, 5), COMPAT_LINEAR, "weight")}
    wmap = plan(rules, {"l.0.gate_up.weight": (8, 5)}, slots)
    out = build_targets(wmap.entries[0], {"l.0.gate_up.weight": fused}.__getitem__)
    np.testing.assert_array_equal(out["l.0.gate.weight"], fused[:4])
    np.testing.assert_array_equal(out["l.0.up.weight"], fused[4:])
    assert same_bytes(build_sources(wmap.entries[0], out.__getitem__)["l.0.gate_up.weight"], fused)
    # gradients of the parts come back as the fused tensor's, only when every part is here
    joined, left = wmap.to_reference(out)
    assert same_bytes(joined["l.0.gate_up.weight"], fused) and left == []
    joined, left = wmap.to_reference({"l.0.gate.weight": out["l.0.gate.weight"]})
    assert joined == {} and left == ["l.0.gate.weight"]


def test_merge_with_a_missing_part_is_named(tmp_path):
    src = qkv_source()
    del src["l.0.v.weight"]
    with pytest.raises(WeightError, match=r"l\.0\.q\.weight: merge in rules\.toml needs exactly one .*v\\\\.weight"):
        plan(rules_file(tmp_path, QKV_MERGE), shapes(src), {"l.0.qkv.weight": PortSlot((5, 24), LINEAR, "weight")},
             config={"num_key_value_heads": 2})


def test_merge_and_split_parts_round_trip():
    rng = np.random.default_rng(2)
    parts = [rng.normal(size=(6, 2)), rng.normal(size=(4, 2))]
    for groups in (1, 2):
        whole = merge_parts(parts, 0, groups)
        back = split_parts(whole, ((6, 2), (4, 2)), 0, groups)
        assert all(same_bytes(a, b) for a, b in zip(back, parts))


def test_rules_can_be_generated_from_the_port_and_read_back(tmp_path):
    slots = {"a.q.weight": PortSlot((4, 4), LINEAR, "weight"), "a.head.weight": PortSlot((4, 4), COMPAT_LINEAR, "weight"),
             "a.norm.weight": PortSlot((4,), EMBEDDING, "weight")}
    text = render_rules(slots, "generated for a test")
    path = tmp_path / "gen.toml"
    path.write_text(text)
    rules = load_rules(path)
    assert dict(rules.transpose) == {r"a\.q\.weight": True, r"a\.head\.weight": False}


@pytest.mark.parametrize("text,key", [
    ("transpose = true\n", "transpose"),
    ('[[rename]]\nfrom = "("\nto = "x"\n', "rename[0].from"),
    ('[[rename]]\nfrom = "a"\n', "rename[0]"),
    ('[[merge]]\nfrom = "a"\nto = "b"\n', "merge[0].from"),
    ('[[split]]\nfrom = "a"\nto = ["b", "c"]\naxis = "x"\n', "split[0].axis"),
    ("bogus = 1\n", "bogus"),
])
def test_bad_rules_file(tmp_path, text, key):
    with pytest.raises(ConfigError) as e:
        rules_file(tmp_path, text)
    assert e.value.key == key


def test_computed_port_tensors_are_never_written_and_must_exist(tmp_path):
    """A persistable index the port computes (PaddleClas's relative_position_index) is left
    as the port made it; a `computed` pattern that names no port tensor is a mistake."""
    slots = {"w.weight": PortSlot((2,), EMBEDDING, "weight"), "attn.index": PortSlot((4,), EMBEDDING, "index")}
    with pytest.raises(WeightError, match=r"never written by rules\.toml: attn\.index"):
        plan(rules_file(tmp_path), {"w.weight": (2,)}, slots)
    wmap = plan(rules_file(tmp_path, "computed = ['attn\\.index']\n"), {"w.weight": (2,)}, slots)
    assert [e.target for e in wmap.entries] == ["w.weight"]
    with pytest.raises(WeightError, match=r"computed 'nothing\\\\\.here' matches no port tensor"):
        plan(rules_file(tmp_path, "computed = ['nothing\\.here']\n"), {"w.weight": (2,)}, slots)


def test_a_scalar_parameter_comes_back_as_a_scalar(tmp_path):
    """A 0-d tensor (CLIP's logit_scale) keeps its shape on the way back."""
    src = {"scale": np.array(2.5, dtype=np.float32)}
    wmap = plan(rules_file(tmp_path), shapes(src), {"scale": PortSlot((), ("torch.nn", "Module"), "scale")})
    back, left = wmap.to_reference({"scale": np.array(0.5, dtype=np.float32)})
    assert back["scale"].shape == () and left == []
