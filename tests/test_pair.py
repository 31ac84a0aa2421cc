"""Pairing is by exact name through the rules' renames; nothing is matched by position."""

from align.capture.trace import ROOT
from align.compare.pair import pair_calls


def identity(name):
    return name, "same name"


def test_pairs_by_name_including_repeated_calls_and_root():
    ref = [("a.b", "a.b"), ("a.b#2", "a.b"), (ROOT, ROOT)]
    p = pair_calls(ref, {ROOT, "a", "a.b"}, identity, [("a.b", "a.b"), ("a.b#2", "a.b"), (ROOT, ROOT)])
    assert [(x.ref, x.port) for x in p.pairs] == [("a.b", "a.b"), ("a.b#2", "a.b#2"), (ROOT, ROOT)]
    assert p.unpaired == ()


def test_missing_and_extra_are_listed_with_reasons():
    p = pair_calls([("enc.mlp", "enc.mlp")], {ROOT, "enc"}, identity, [("enc.extra", "enc.extra")])
    assert p.pairs == ()
    sides = {(u.name, u.side) for u in p.unpaired}
    assert sides == {("enc.mlp", "reference"), ("enc.extra", "port")}
    assert "the port has no module 'enc.mlp'" in p.unpaired[0].reason


def test_renamed_modules_pair():
    def rename(name):
        return name.replace("encoder.layer", "layers"), "rename"

    p = pair_calls([("encoder.layer.0", "encoder.layer.0")], {"layers.0"}, rename)
    assert p.pairs[0].port == "layers.0"


def test_position_never_decides():
    # Same structure, different names: nothing pairs, both sides are reported.
    p = pair_calls([("x", "x")], {"y"}, identity, [("y", "y")])
    assert p.pairs == () and len(p.unpaired) == 2


def test_positional_names_are_each_forwards_own():
    """Inputs are keyed by the forward's parameter names, kept per function once asked: two
    classes, an override, and a forward set on one instance must each keep their own."""
    import functools

    from align.capture.structure import positional_names

    class A:
        def forward(self, x, mask=None, *rest, scale=1.0):
            return x

    class B(A):
        def forward(self, hidden_states, /, position_ids):
            return hidden_states

    def wrapper(fn):
        @functools.wraps(fn)
        def inner(self, *args, **kwargs):
            return fn(self, *args, **kwargs)
        return inner

    class C:
        forward = wrapper(B.forward)

    a, b, c, other = A(), B(), C(), A()
    other.forward = functools.partial(lambda q, k: q, 1)
    for _ in range(2):  # asked again: the kept answer
        assert positional_names(a.forward) == ("x", "mask")
        assert positional_names(b.forward) == ("hidden_states", "position_ids")
        assert positional_names(c.forward) == ("hidden_states", "position_ids")  # through functools.wraps
        assert positional_names(other.forward) == ("k",)
