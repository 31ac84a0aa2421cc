"""Pair reference module calls with port modules, by name, through the weight rules' renames.

Exact pairing only: a reference call whose renamed module does not exist in the port is
listed with the reason, never matched by position or by a similar name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from align.capture.trace import ROOT


@dataclass(frozen=True)
class Pair:
    ref: str  # reference call name, e.g. "model.layers.0.mlp" or "x#2" for a repeated call
    port: str  # port call name
    ref_module: str
    port_module: str


@dataclass(frozen=True)
class Unpaired:
    name: str
    side: str  # "reference" or "port"
    reason: str
    allowed: bool = False  # the rules say this module has no counterpart by design

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Pairing:
    pairs: tuple[Pair, ...]
    unpaired: tuple[Unpaired, ...]


def port_call_name(ref_call: str, ref_module: str, rename: Callable[[str], tuple[str, str]]) -> tuple[str, str]:
    """(port call name, port module path) for a reference call."""
    port_module = ROOT if ref_module == ROOT else rename(ref_module)[0]
    return port_module + ref_call[len(ref_module):], port_module


def pair_calls(
    ref_calls: Iterable[tuple[str, str]],
    port_modules: set[str],
    rename: Callable[[str], tuple[str, str]],
    port_calls: Iterable[tuple[str, str]] = (),
) -> Pairing:
    """ref_calls: (call name, module path) in reference order; port_modules: every port module
    path; port_calls: the calls the port made in its own run, to list those with no partner."""
    pairs, unpaired, claimed = [], [], set()
    for call, module in ref_calls:
        port_call, port_module = port_call_name(call, module, rename)
        if port_module not in port_modules:
            how = "same name" if port_module == module else f"renamed to {port_module!r}"
            unpaired.append(Unpaired(call, "reference", f"the port has no module {port_module!r} ({how})"))
            continue
        pairs.append(Pair(call, port_call, module, port_module))
        claimed.add(port_call)
    for call, _ in port_calls:
        if call not in claimed:
            unpaired.append(Unpaired(call, "port", "no reference module maps to it"))
    return Pairing(tuple(pairs), tuple(unpaired))
