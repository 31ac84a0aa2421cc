"""Weights into models: the port gets the reference's weights through the plan, and every
tensor loaded is read back and checked bit-exact.

In memory, the whole state dict at once (load_weights). Streamed, a module subtree at a
time from a memory-mapped checkpoint into both skeletons, and out again (Loader).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from align.errors import ConfigError
from align.weights.plan import (
    WeightEntry,
    WeightMap,
    build_targets,
    convert,
    describe_slots,
    plan,
    same_bytes,
    verify,
)
from align.weights.rules import Rules


def plan_for(rules: Rules, source: dict[str, np.ndarray], port: Any, config: dict) -> WeightMap:
    owners = dict(port.named_sublayers(include_self=True))
    return plan(rules, {k: v.shape for k, v in source.items()}, describe_slots(port.state_dict(), owners),
                  config, same=lambda a, b: same_bytes(source[a], source[b]))


def load_weights(rules: Rules, source: dict[str, np.ndarray], port: Any, ps: Any, config: dict) -> WeightMap:
    """Plan, convert, load and verify bit-exact: the port gets the reference's weights."""
    port_state = port.state_dict()
    wmap = plan_for(rules, source, port, config)
    for key, arr in convert(wmap, source).items():
        port_state[key].set_value(arr)
    return verify(wmap, source, lambda k: ps.record(port_state[k]).data)


def within(key: str, prefix: str) -> bool:
    return not prefix or key == prefix or key.startswith(prefix + ".")


class Loader:
    """Puts weights into both skeletons from the checkpoint, a module subtree at a time, and
    takes them out again. Every port tensor loaded is read back and checked bit-exact."""

    def __init__(self, ckpt: Any, wmap: WeightMap, ref: Any, port: Any, rename: Callable[[str], str]):
        import torch

        self.torch, self.ckpt, self.wmap, self.rename = torch, ckpt, wmap, rename
        # A tied reference parameter is one Parameter under several names: loaded once.
        self.slots: dict[str, list[tuple[Any, str]]] = {}
        self.first_name: dict[str, str] = {}
        by_id: dict[int, str] = {}
        for mod_name, mod in ref.named_modules():
            for attr, p in mod.named_parameters(recurse=False):
                key = f"{mod_name}.{attr}" if mod_name else attr
                first = by_id.setdefault(id(p), key)
                self.slots.setdefault(first, []).append((mod, attr))
                self.first_name[key] = first
        self.port_state = port.state_dict()
        self.checked: dict[str, WeightEntry] = {}

    def _ref_keys(self, prefix: str, exclude: str | None) -> list[str]:
        return sorted({first for key, first in self.first_name.items()
                       if within(key, prefix) and not (exclude and within(key, exclude))})

    def _port_entries(self, prefix: str, exclude: str | None) -> list[WeightEntry]:
        p, x = self.rename(prefix) if prefix else "", self.rename(exclude) if exclude else None
        return [e for e in self.wmap.written() if any(within(t, p) and not (x and within(t, x)) for t in e.targets)]

    def load_ref(self, prefix: str, exclude: str | None = None) -> None:
        torch = self.torch
        for first in self._ref_keys(prefix, exclude):
            names = [k for k, f in self.first_name.items() if f == first]
            stored = next((k for k in names if k in self.ckpt.where), None)
            if stored is None:
                raise ConfigError(self.ckpt.path, "", f"has no tensor for the reference's {first}")
            param = torch.nn.Parameter(torch.from_numpy(np.array(self.ckpt.get(stored))))
            for mod, attr in self.slots[first]:
                mod._parameters[attr] = param
            self.ckpt.release(stored)

    def free_ref(self, prefix: str, exclude: str | None = None) -> None:
        torch = self.torch
        for first in self._ref_keys(prefix, exclude):
            mod, attr = self.slots[first][0]
            old = mod._parameters[attr]
            meta = torch.nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device="meta"))
            for mod, attr in self.slots[first]:
                mod._parameters[attr] = meta

    def load_port(self, prefix: str, exclude: str | None = None) -> None:
        entries = self._port_entries(prefix, exclude)
        for e in entries:
            for target, arr in build_targets(e, self.ckpt.get).items():
                self.port_state[target].set_value(arr)
        checked = verify(WeightMap(tuple(entries)), _Source(self.ckpt), lambda k: _read_back(self.port_state[k]))
        self.checked.update({e.target: e for e in checked.entries})
        for e in entries:
            for k in e.sources:
                self.ckpt.release(k)

    def free_port(self, prefix: str, exclude: str | None = None) -> None:
        for e in self._port_entries(prefix, exclude):
            for target in e.targets:
                self.port_state[target]._clear_data()

    def weight_map(self) -> WeightMap:
        return WeightMap(tuple(self.checked.get(e.target, e) for e in self.wmap.entries),
                           self.wmap.unmapped, self.wmap.unwritten)


def _read_back(t: Any) -> np.ndarray:
    """A loaded port tensor as numpy, to check its bytes: a view where DLPack gives one (a
    full-size shell's 2.4 GB embedding was copied to be checked, twice with the tied head),
    else Paddle's own copy (bf16 comes back as its uint16 words, as the checkpoint holds them)."""
    try:
        return np.from_dlpack(t.detach())
    except (BufferError, RuntimeError, TypeError, ValueError):
        return t.numpy()


class _Source(Mapping):
    """The checkpoint as verify reads it: key -> array, mapped on demand."""

    def __init__(self, ckpt: Any):
        self.ckpt = ckpt

    def __getitem__(self, key: str) -> np.ndarray:
        return self.ckpt.get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.ckpt.where)

    def __len__(self) -> int:
        return len(self.ckpt.where)
