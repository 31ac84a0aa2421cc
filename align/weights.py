"""Weight rules: the reference's state dict -> the port's, and back.

A rules file (weights/<model>.toml) holds renames with regex captures, ties and ignores.
Transposes normally follow from the type of the port layer that owns the target parameter
(`paddle.nn.Linear` stores [in, out]; `paddle.compat.nn.Linear` keeps torch's [out, in]);
a `[transpose]` table can override that by name for a layer whose type does not say.
Shapes never decide: a square matrix fits either way.

The same renames map reference module names to port module names for pairing.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from align.spec import ConfigError

# Port layer type (module path, class name) -> parameter names stored transposed vs torch.
TRANSPOSED_BY_TYPE: dict[tuple[str, str], frozenset[str]] = {
    ("paddle.nn.layer.common", "Linear"): frozenset({"weight"}),
}


class WeightError(Exception):
    """A weight that cannot be mapped, loaded or verified; names the tensor and the rule."""


@dataclass(frozen=True)
class Rename:
    pattern: str
    replacement: str

    def apply(self, key: str) -> str | None:
        m = re.fullmatch(self.pattern, key)
        return m.expand(self.replacement) if m else None


@dataclass(frozen=True)
class Rules:
    source: Path
    renames: tuple[Rename, ...]
    tie: dict[str, str]  # reference key -> the reference key it shares storage with
    ignore: tuple[str, ...]  # regexes over reference keys that the port does not hold
    transpose: tuple[tuple[str, bool], ...] = ()  # explicit layout by name, overriding the layer type

    def rename(self, name: str) -> tuple[str, str]:
        """(port name, the rule that produced it) for a reference parameter or module name."""
        for r in self.renames:
            out = r.apply(name)
            if out is not None:
                return out, f"rename {r.pattern!r} -> {r.replacement!r}"
        return name, "same name"

    def ignored(self, key: str) -> str | None:
        return next((p for p in self.ignore if re.fullmatch(p, key)), None)

    def transpose_override(self, key: str) -> tuple[str, bool] | None:
        return next(((p, t) for p, t in self.transpose if re.fullmatch(p, key)), None)


def load_rules(path: Path) -> Rules:
    """Parse weights/<model>.toml; errors name the file and key."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(path, "", "no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "", f"not valid TOML: {e}") from None
    unknown = sorted(set(data) - {"rename", "tie", "ignore", "transpose"})
    if unknown:
        raise ConfigError(path, unknown[0], "unknown key (expected one of: ignore, rename, tie, transpose)")
    renames = []
    for i, r in enumerate(data.get("rename", [])):
        if not isinstance(r, dict) or set(r) != {"from", "to"}:
            raise ConfigError(path, f"rename[{i}]", "expected a table with exactly 'from' and 'to'")
        try:
            re.compile(r["from"])
        except re.error as e:
            raise ConfigError(path, f"rename[{i}].from", f"bad regex {r['from']!r}: {e}") from None
        renames.append(Rename(r["from"], r["to"]))
    tie = data.get("tie", {})
    if not isinstance(tie, dict) or not all(isinstance(v, str) for v in tie.values()):
        raise ConfigError(path, "tie", "expected a table of 'key' = 'key it is tied to'")
    ignore = data.get("ignore", [])
    if not isinstance(ignore, list) or not all(isinstance(v, str) for v in ignore):
        raise ConfigError(path, "ignore", "expected an array of regexes")
    transpose = data.get("transpose", {})
    if not isinstance(transpose, dict) or not all(isinstance(v, bool) for v in transpose.values()):
        raise ConfigError(path, "transpose", "expected a table of 'regex' = true/false")
    return Rules(path, tuple(renames), dict(tie), tuple(ignore), tuple(transpose.items()))


@dataclass(frozen=True)
class WeightEntry:
    """One row of the weight map: where a reference tensor went and whether it arrived intact."""

    source: str
    target: str | None
    source_shape: tuple[int, ...]
    target_shape: tuple[int, ...] | None
    transform: str  # "copy", "transpose", "tied" (shares a port tensor written elsewhere), "ignored"
    rule: str  # the rule that decided it, in words
    transposed: bool = False  # the port stores it transposed (decided by the port layer's type)
    exact: bool | None = None  # bit-exact after loading; None where nothing was loaded

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class WeightMap:
    entries: tuple[WeightEntry, ...]

    def written(self) -> list[WeightEntry]:
        """The entries that write a port tensor (not tied aliases, not ignored)."""
        return [e for e in self.entries if e.transform in ("copy", "transpose")]

    def to_reference(self, target: str, array: np.ndarray) -> tuple[str, np.ndarray]:
        """Bring a port tensor (e.g. a gradient) into the reference's name and layout."""
        for e in self.entries:
            if e.target == target:
                return e.source, (array.T if e.transposed else array)
        raise KeyError(target)

    @property
    def all_exact(self) -> bool:
        loaded = [e for e in self.entries if e.exact is not None]
        return bool(loaded) and all(e.exact for e in loaded)


@dataclass(frozen=True)
class PortSlot:
    """What the mapper needs to know about one port tensor, framework-free."""

    shape: tuple[int, ...]
    owner_type: tuple[str, str]  # (module, class name) of the layer holding it
    param_name: str  # the attribute name on that layer ("weight", "bias", ...)
    alias_of: str | None = None  # another key holding the very same tensor (a tied parameter)


def plan(rules: Rules, source: Mapping[str, np.ndarray], port: Mapping[str, PortSlot]) -> WeightMap:
    """Decide, for every reference tensor, its port key and transform. Strict: every source
    key maps somewhere (or is tied/ignored), every port tensor is written, nothing twice."""
    entries: list[WeightEntry] = []
    written: dict[str, str] = {}
    for key, arr in source.items():
        shape = tuple(arr.shape)
        if (pattern := rules.ignored(key)) is not None:
            entries.append(WeightEntry(key, None, shape, None, "ignored", f"ignore {pattern!r}"))
            continue
        target, rule = rules.rename(key)
        slot = port.get(target)
        if slot is None:
            raise WeightError(
                f"{key}: unmapped reference tensor ({rule} gives {target!r}, which the port does not have); "
                f"add a rename or an ignore rule to {rules.source.name}"
            )
        if key in rules.tie:
            partner = rules.tie[key]
            if partner not in source:
                raise WeightError(f"{key}: tied to {partner!r} by {rules.source.name}, but the reference has no {partner!r}")
            if not _same_bytes(arr, source[partner]):
                raise WeightError(f"{key}: tied to {partner!r} by {rules.source.name}, but the reference tensors differ")
            if slot.alias_of is not None:
                entries.append(WeightEntry(key, target, shape, slot.shape, "tied", f"tie to {partner}",
                                           _transposed(slot)))
                continue
        elif slot.alias_of is not None:
            raise WeightError(
                f"{key} -> {target}: the port shares this tensor with {slot.alias_of!r}, "
                f"but {rules.source.name} has no tie for {key!r}"
            )
        if target in written:
            raise WeightError(f"{target}: written twice, from {written[target]!r} and {key!r} ({rule})")
        transposed = _transposed(slot)
        if (override := rules.transpose_override(key)) is not None:
            transposed = override[1]
            rule = f"{rule}, transpose {override[0]!r} = {str(override[1]).lower()}"
        if transposed and len(shape) != 2:
            raise WeightError(f"{key} -> {target}: transpose needs a matrix, got shape {shape} ({rule})")
        out_shape = shape[::-1] if transposed else shape
        if out_shape != slot.shape:
            raise WeightError(
                f"{key} -> {target}: shape mismatch ({rule}, {'transpose' if transposed else 'copy'}): "
                f"reference {shape} gives {out_shape}, port expects {slot.shape}"
            )
        written[target] = key
        entries.append(WeightEntry(key, target, shape, slot.shape, "transpose" if transposed else "copy", rule,
                                   transposed))
    never = sorted(k for k, s in port.items() if s.alias_of is None and k not in written)
    if never:
        raise WeightError(
            f"port tensor(s) never written by {rules.source.name}: {', '.join(never)} "
            f"(reference has no tensor mapping to them)"
        )
    return WeightMap(tuple(entries))


def convert(wmap: WeightMap, source: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The port's state dict (numpy) under the planned transforms."""
    out = {}
    for e in wmap.written():
        arr = source[e.source]
        out[e.target] = np.ascontiguousarray(arr.T) if e.transposed else arr
    return out


def verify(wmap: WeightMap, source: Mapping[str, np.ndarray], read_back: Callable[[str], np.ndarray]) -> WeightMap:
    """Read each loaded port tensor back and check it is bit-exact with its source."""
    checked = []
    for e in wmap.entries:
        if e.target is None:
            checked.append(e)
            continue
        got = read_back(e.target)
        expected = source[e.source].T if e.transposed else source[e.source]
        checked.append(WeightEntry(**{**asdict(e), "exact": _same_bytes(got, expected)}))
    result = WeightMap(tuple(checked))
    bad = [e for e in result.entries if e.exact is False]
    if bad:
        names = ", ".join(f"{e.source} -> {e.target}" for e in bad)
        raise WeightError(f"loaded port tensor(s) differ from their source: {names}")
    return result


def _transposed(slot: PortSlot) -> bool:
    return slot.param_name in TRANSPOSED_BY_TYPE.get(slot.owner_type, frozenset())


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def describe_slots(named_tensors: Mapping[str, Any], owners: Mapping[str, Any]) -> dict[str, PortSlot]:
    """PortSlots from a Paddle layer's state_dict and its sublayers (a framework-free view)."""
    slots: dict[str, PortSlot] = {}
    first_key_of: dict[int, str] = {}
    for key, tensor in named_tensors.items():
        owner_path, _, attr = key.rpartition(".")
        owner = owners[owner_path]
        alias = first_key_of.setdefault(id(tensor), key)
        slots[key] = PortSlot(
            shape=tuple(tensor.shape),
            owner_type=(type(owner).__module__, type(owner).__name__),
            param_name=attr,
            alias_of=None if alias == key else alias,
        )
    return slots
