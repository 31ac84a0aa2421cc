"""The forced pass's mechanics: each stretch's backward runs as its call returns, with the
same comparisons as one backward at the end, and falls back to that when a port value
reaches another module's code by a way no boundary shows."""

import numpy as np
import pytest
import torch

from align.capture.force import Forcer, Rejoined, force
from align.capture.hooks import hooked, run_and_record
from align.capture.torch_side import TorchSide
from align.compare.judges import Collector
from align.compare.results import Tolerances
from align.registry.spec import Tolerance

TOL = Tolerances(Tolerance(1e-5, 1e-5), ())


class Child(torch.nn.Module):
    def __init__(self, side_channel: bool):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.side_channel = side_channel

    def forward(self, x):
        h = self.lin(x)
        if self.side_channel:
            self.saved = h * 2  # read by the parent: the graph crosses no boundary here
        return torch.tanh(h)


class Parent(torch.nn.Module):
    def __init__(self, side_channel: bool):
        super().__init__()
        self.child, self.out = Child(side_channel), torch.nn.Linear(3, 1)
        self.side_channel = side_channel

    def forward(self, x):
        y = self.out(self.child(x))
        if self.side_channel:
            y = y + self.child.saved.sum(-1, keepdim=True)
        return y.sum()


def _forced(side_channel: bool, eager: bool | None = None):
    torch.manual_seed(0)
    model, x = Parent(side_channel), torch.randn(4, 3)
    ts = TorchSide()
    trace = run_and_record(ts, model, {"x": x}, lambda out: out, keep_inputs=True)
    judge = Collector(TOL)
    names = {n: n for n in trace.calls}
    if eager is None:
        forcer = force(ts, model, {"x": x}, trace.calls, names, judge, trace.param_grads, dict)
    else:
        forcer = Forcer(ts, trace.calls, names, judge, eager=eager)
        with hooked(ts, model, forcer):
            model(x=x)
        forcer.backward(model, trace.param_grads, dict)
    return forcer, {(o, d, label): m for (o, d), items in judge.found.items() for label, m in items}


def test_stretches_run_as_they_return_with_the_same_comparisons():
    forcer, eager = _forced(False)
    assert forcer.eager
    _, once = _forced(False, eager=False)
    assert eager.keys() == once.keys() and len(eager) > 5
    assert all(m.passed for m in eager.values())
    assert all(eager[k].max_abs == once[k].max_abs for k in eager)


def test_a_side_channel_falls_back_to_one_backward():
    forcer, found = _forced(True)
    assert not forcer.eager  # the first attempt saw a leaf's gradient arrive twice
    assert all(m.passed for m in found.values()), [k for k, m in found.items() if not m.passed]
    assert all(np.isfinite(m.max_abs) for m in found.values())
    # Eager alone would judge the child's leaf on part of its gradient: it must say so.
    with pytest.raises(Rejoined, match="two backward passes"):
        _forced(True, eager=True)


class ReadsWeight(torch.nn.Module):
    """Uses a submodule's weight without calling the submodule (as DeBERTa's relative
    position embeddings do)."""

    def __init__(self):
        super().__init__()
        self.table, self.lin = torch.nn.Embedding(5, 3), torch.nn.Linear(3, 3)

    def forward(self, x):
        return (self.lin(x) @ self.table.weight.T).sum()


def test_parameters_of_a_module_never_called_count_for_the_caller_that_used_them():
    torch.manual_seed(0)
    model, x = ReadsWeight(), torch.randn(4, 3)
    ts = TorchSide()
    trace = run_and_record(ts, model, {"x": x}, lambda out: out, keep_inputs=True)
    assert "table" not in trace.calls and "table.weight" in trace.param_grads
    judge = Collector(TOL)
    force(ts, model, {"x": x}, trace.calls, {n: n for n in trace.calls}, judge, trace.param_grads,
          dict)
    root = dict(judge.labelled("<root>", "backward", "grad of parameter "))
    assert root["table.weight"].passed and "lin.weight" not in root  # lin's own call judges lin's


class Renamed(torch.nn.Module):
    """Parent with its child under another name, as a port may call it (a rename rule)."""

    def __init__(self):
        super().__init__()
        self.kid, self.out = Child(False), torch.nn.Linear(3, 1)

    def forward(self, x):
        return self.out(self.kid(x)).sum()


def test_a_renamed_module_is_judged_under_the_reference_names():
    """Every comparison of a port whose modules are named otherwise carries the reference's
    names, owner and label alike: the noise floor's truth, kept from a float64 forced run of
    the reference, is looked up by them."""
    torch.manual_seed(0)
    ref, x = Parent(False), torch.randn(4, 3)
    port = Renamed()
    port.load_state_dict({k.replace("child.", "kid."): v for k, v in ref.state_dict().items()})
    ts = TorchSide()
    trace = run_and_record(ts, ref, {"x": x}, lambda out: out, keep_inputs=True)

    def judged(model, to_ref):
        judge = Collector(TOL)
        force(ts, model, {"x": x}, trace.calls, to_ref, judge, trace.param_grads,
              lambda grads: {k.replace("kid.", "child."): g for k, g in grads.items()})
        return {(o, d, label): m for (o, d), items in judge.found.items() for label, m in items}

    own = judged(ref, {n: n for n in trace.calls})
    renamed = judged(port, {n.replace("child", "kid"): n for n in trace.calls})
    assert any("child" in label for _, _, label in own), "the test needs labels that name a module"
    assert renamed.keys() == own.keys()
    assert all(m.passed for m in renamed.values())


class WithWeights(torch.nn.Module):
    """Returns its output and the weights it used, as an attention layer does."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x):
        w = torch.softmax(self.lin(x), -1)
        return w * x, w


class Bare(WithWeights):
    """The same layer returning its output alone (PaddleClas's attention does), or, broken,
    the output scaled."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return super().forward(x)[0] * self.scale


class Outer(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer, self.out = layer, torch.nn.Linear(3, 1)

    def forward(self, x):
        y = self.layer(x)
        return self.out(y[0] if isinstance(y, tuple) else y).sum()


@pytest.mark.parametrize("scale, culprit", [(1.0, None), (1.5, "layer")])
def test_a_bare_output_answers_the_first_element_of_the_references_tuple(scale, culprit):
    torch.manual_seed(0)
    ref, x = Outer(WithWeights()), torch.randn(4, 3)
    port = Outer(Bare(scale))
    port.load_state_dict(ref.state_dict())
    ts = TorchSide()
    trace = run_and_record(ts, ref, {"x": x}, lambda out: out, keep_inputs=True)
    assert set(trace.calls["layer"].outputs) == {"0", "1"}
    judge = Collector(TOL)
    force(ts, port, {"x": x}, trace.calls, {n: n for n in trace.calls}, judge, trace.param_grads,
          dict)
    found = {(o, d, label): m for (o, d), items in judge.found.items() for label, m in items}
    assert ("layer", "forward", "output 0") in found  # judged against the tuple's first element
    failing = {o for (o, _, _), m in found.items() if not m.passed}
    assert failing == ({culprit} if culprit else set()), failing


def test_the_float64_truth_forces_only_the_calls_the_port_forces():
    """A port with no counterpart of child.lin (it fuses it into child) is forced at child and
    the root only; its truth must be too, or child.lin's weight gradient would be judged
    against a stretch (lin alone, from lin's recorded output gradient) the port never runs
    (measured on a fused qkv at ViT-B/16: a false alarm at every attention)."""
    from align.capture.trace import PARAMETER_GRAD, ROOT
    from align.compare.judges import truth_key
    from align.core.reference import float64_copy, forced_truth

    torch.manual_seed(0)
    model, x = Parent(side_channel=False), torch.randn(4, 3)
    ts = TorchSide()
    trace = run_and_record(ts, model, {"x": x}, lambda out: out, keep_inputs=True)

    def make(widened):
        return {"x": x.double()}

    key = PARAMETER_GRAD + "child.lin.weight"
    every = forced_truth(ts, float64_copy(model), trace.calls, trace.param_grads, make)
    assert truth_key("child.lin", key) in every and truth_key("child", key) not in every
    mirrored = forced_truth(ts, float64_copy(model), trace.calls, trace.param_grads, make, forced={ROOT, "child"})
    assert truth_key("child.lin", key) not in mirrored
    # exactly the gradient of child's whole stretch, lin and tanh, from child's recorded output gradient
    child = float64_copy(model.child)
    (grad_out,) = trace.calls["child"].grads.values()
    (child(x.double()) * torch.from_numpy(grad_out).double()).sum().backward()
    np.testing.assert_allclose(mirrored[truth_key("child", key)], child.lin.weight.grad.numpy(), rtol=1e-12, atol=0)


class ByKeyword(torch.nn.Module):
    """Calls its layer by keyword, as transformers' layers call their attention
    (`self_attn(hidden_states=...)`)."""

    def __init__(self):
        super().__init__()
        self.layer, self.out = HiddenStates(), torch.nn.Linear(3, 1)

    def forward(self, x):
        return self.out(self.layer(hidden_states=torch.tanh(x))).sum()


class HiddenStates(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, hidden_states):
        return self.lin(hidden_states) * hidden_states


class Positional(ByKeyword):
    """The same model whose layer takes `x` by position (a timm-style port)."""

    def __init__(self):
        super().__init__()
        self.layer = TakesX()

    def forward(self, x):
        return self.out(self.layer(torch.tanh(x))).sum()


class TakesX(HiddenStates):
    def forward(self, x):
        return self.lin(x) * x


def test_a_positional_input_answers_the_references_keyword_of_that_position():
    """The port's `x` at position 0 is the reference's `hidden_states=`, passed by keyword: it
    is replaced by the reference's value, and the gradient that comes back to it is judged as
    the layer's own, not left to the port's own upstream value."""
    torch.manual_seed(0)
    ref, x = ByKeyword(), torch.randn(4, 3, requires_grad=True)
    port = Positional()
    port.load_state_dict(ref.state_dict())
    ts = TorchSide()
    trace = run_and_record(ts, ref, {"x": x}, lambda out: out, keep_inputs=True)
    assert trace.calls["layer"].arg_names == () and trace.calls["layer"].params == ("hidden_states",)
    judge = Collector(TOL)
    forcer = force(ts, port, {"x": x}, trace.calls, {n: n for n in trace.calls}, judge, trace.param_grads, dict)
    assert forcer.notes["layer"].ignored == []
    found = {(o, d, label) for (o, d), items in judge.found.items() for label, _ in items}
    assert ("layer", "backward", "grad of input hidden_states") in found
