"""Where the bug is: the first divergence in forward and backward order, and the culprits,
the failing modules all of whose children pass (teacher-forced, a module that fails while
its children pass holds the bug in its own code)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from align.capture.trace import BACKWARD, FORWARD, ROOT
from align.compare.metrics import not_compared, rel_l2
from align.compare.results import Amplification, Culprits, Divergence, LayerResult, deepest


def amplification(port_in: Mapping[str, np.ndarray], ref_in: Mapping[str, np.ndarray],
                  port_out: Mapping[str, np.ndarray], ref_out: Mapping[str, np.ndarray]) -> Amplification:
    """Compare the error at a module's output with the error at its input (shared keys only)."""
    in_err = max((rel_l2(port_in[k], ref_in[k]) for k in ref_in if k in port_in), default=0.0)
    out_err = max((rel_l2(port_out[k], ref_out[k]) for k in ref_out if k in port_out), default=0.0)
    return Amplification.of(in_err, out_err)


def first_divergence(layers: tuple[LayerResult, ...], forward_order: list[str], backward_order: list[str]) -> Divergence:
    """First failing module in forward completion order, and in backward order.

    Children complete their forward before their parents and their backward before their
    parents, so in both orders the first failure is the smallest module that fails. Modules
    never reached (the port raised before them) are no divergence of their own.
    """
    by_name = {layer.name: layer for layer in layers if layer.reached and layer.called}
    fwd = next((n for n in forward_order if n in by_name and not by_name[n].forward.passed), None)
    bwd = next((n for n in backward_order if n in by_name and by_name[n].backward is not None
                and not by_name[n].backward.passed), None)
    return Divergence(*(None if n is None else _blamed(by_name[n], layers)[0] for n in (fwd, bwd)))


def _blamed(layer: LayerResult, layers: tuple[LayerResult, ...]) -> list[str]:
    """Whose code a failing module's failure is: its own, or, where the port fed it another
    tensor than the reference's (see culprits), its caller's."""
    callers = _callers(layer, layers) if layer.foreign_inputs else []
    return [c.name for c in callers] or [layer.name]


def _failed(layer: LayerResult, direction: str) -> bool:
    m = layer.forward if direction == FORWARD else layer.backward
    return layer.reached and layer.called and m is not None and not m.passed


def culprits(layers: tuple[LayerResult, ...], forward_order: list[str], backward_order: list[str]) -> Culprits:
    """Failing modules none of whose submodules fail, in the same direction.

    Under teacher forcing every module sees the reference's inputs, so a module that fails
    while all of its children pass holds the bug in its own code: a functional attention
    core, a mask built in forward, a loss. Listed in forward (or backward) order.

    A module the port fed another tensor than the reference's (foreign_inputs: other sizes,
    which forcing cannot replace) was not judged on the reference's input: the code that
    made that input, its caller's, is named instead (a cross-attention keyed on the text).
    """
    found = {}
    by_name = {layer.name: layer for layer in layers}
    for direction, order in ((FORWARD, forward_order), (BACKWARD, backward_order)):
        rank = {n: i for i, n in enumerate(order)}
        names = {blamed for name in deepest([layer for layer in layers if _failed(layer, direction)])
                 for blamed in _blamed(by_name[name], layers)}
        found[direction] = tuple(sorted(names, key=lambda n: rank.get(n, len(rank))))
    named = set(found[FORWARD]) | set(found[BACKWARD])
    skipped: dict[str, list[str]] = {}
    for layer in layers:
        if layer.reached and not layer.called:
            for caller in _callers(layer, layers):
                if caller.name in named:
                    skipped.setdefault(caller.name, []).append(layer.name)
    return Culprits(found[FORWARD], found[BACKWARD], {k: tuple(v) for k, v in skipped.items()})


def _callers(layer: LayerResult, layers: tuple[LayerResult, ...]) -> list[LayerResult]:
    """The calls of the nearest ancestor module the port did call: the code that should have
    called `layer` (the model itself, if nothing nearer)."""
    called = [c for c in layers if c.called and c.reached and c is not layer
              and (c.module == ROOT or layer.module.startswith(c.module + "."))]
    if not called:
        return []
    depth = max(len(c.module) if c.module != ROOT else -1 for c in called)
    return [c for c in called if (len(c.module) if c.module != ROOT else -1) == depth]


def uncalled(layers: tuple[LayerResult, ...]) -> tuple[LayerResult, ...]:
    """A child the port never called fails only if its caller does. When every call of the
    nearest module that was called passes forward and backward without it, the child did
    nothing the reference's did (a dropout in eval, an identity): a note, not a failure.
    When the caller fails, the child still fails, but is no culprit: the caller is, for not
    calling it (see culprits)."""
    out = []
    for layer in layers:
        callers = _callers(layer, layers) if layer.reached and not layer.called else []
        if callers and all(c.passed for c in callers):
            layer = dataclasses.replace(layer, forward=not_compared(
                f"the port never called this module: {callers[0].name} passes forward and backward without "
                "it (a no-op here, as a dropout in eval is)"), backward=None)
        out.append(layer)
    return tuple(out)


