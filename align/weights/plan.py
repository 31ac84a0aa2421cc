"""The weight plan: for every reference tensor, its port tensor(s) and transform, decided from
the rules, names and the port layers' types (see rules.py), then applied and proven bit-exact.

Transposes follow from the type of the port layer that owns each target (`paddle.nn.Linear`
stores [in, out]; `paddle.compat.nn.Linear` keeps torch's [out, in]); merges and splits
happen in the reference's layout, before that transpose. Shapes never decide anything:
a square matrix fits either way.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from align.errors import WeightError
from align.weights.rules import TRANSPOSED_BY_TYPE, Fuse, Rules


@dataclass(frozen=True)
class WeightEntry:
    """One row of the weight map: which reference tensors make which port tensors, and how."""

    source: str  # display: the reference key, or "a + b + c" for a merge
    target: str | None  # display: the port key, or "x + y + z" for a split
    source_shape: tuple[int, ...]
    target_shape: tuple[int, ...] | None
    # "copy", "transpose", "reshape", "permute", "merge", "split", "tied" (shares a port tensor), "ignored"
    transform: str
    rule: str  # the rule that decided it, in words
    transposed: bool = False  # the port stores it transposed (decided by the port layer's type)
    exact: bool | None = None  # bit-exact after loading; None where nothing was loaded
    sources: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    axis: int = 0
    groups: int = 1
    part_shapes: tuple[tuple[int, ...], ...] = ()  # each source's (merge) or target's (split) shape, reference layout
    permute: tuple[int, ...] = ()  # the port holds the reference tensor with these axes (transpose(axes))
    reshape: bool = False  # ... in the port tensor's shape (after the permute)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("sources", "targets", "part_shapes"):
            d.pop(k)
        return d

    @property
    def writes(self) -> bool:
        return self.transform not in ("tied", "ignored")

    def to_port(self, arr: np.ndarray) -> np.ndarray:
        """One reference tensor in the port's layout (permuted, reshaped, transposed)."""
        if self.permute:
            arr = arr.transpose(self.permute)
        if self.reshape:
            arr = arr.reshape(self.target_shape[::-1] if self.transposed else self.target_shape)
        return np.ascontiguousarray(arr.T) if self.transposed else arr

    def to_reference(self, arr: np.ndarray) -> np.ndarray:
        """A port tensor (its gradient, say) back in the reference's layout: to_port undone."""
        arr = arr.T if self.transposed else arr
        if self.reshape:
            shape = self.source_shape
            arr = arr.reshape(tuple(shape[a] for a in self.permute) if self.permute else shape)
        if self.permute:
            arr = arr.transpose(np.argsort(self.permute))
        return arr


@dataclass(frozen=True)
class WeightMap:
    entries: tuple[WeightEntry, ...]
    unmapped: tuple[str, ...] = ()  # source keys that map to nothing (only when planned non-strictly)
    unwritten: tuple[str, ...] = ()  # port keys never written (idem)

    def written(self) -> list[WeightEntry]:
        """The entries that write port tensors (not tied aliases, not ignored)."""
        return [e for e in self.entries if e.writes]

    def to_reference(self, tensors: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
        """Port tensors (gradients, say) in the reference's names and layouts (build_sources):
        a fused port tensor comes back as its parts, the parts of a split one as the tensor
        they were cut from. Also the keys that could not be brought back: written by no entry,
        or parts of a split whose other parts are not among `tensors`."""
        out: dict[str, np.ndarray] = {}
        used: set[str] = set()
        for e in self.entries:
            if e.targets and all(t in tensors for t in e.targets) and not used.intersection(e.targets):
                out.update(build_sources(e, tensors.__getitem__))
                used.update(e.targets)
        return out, [k for k in tensors if k not in used]

    @property
    def all_exact(self) -> bool:
        """Every tensor loaded is bit-exact, and something was loaded if anything was to be
        (a module without weights has nothing to load)."""
        loaded = [e for e in self.entries if e.exact is not None]
        return all(e.exact for e in loaded) and (bool(loaded) or not self.written())


@dataclass(frozen=True)
class PortSlot:
    """What the mapper needs to know about one port tensor, framework-free."""

    shape: tuple[int, ...]
    owner_type: tuple[str, str]  # (module, class name) of the layer holding it
    param_name: str  # the attribute name on that layer ("weight", "bias", ...)
    alias_of: str | None = None  # another key holding the very same tensor (a tied parameter)


def merge_parts(parts: list[np.ndarray], axis: int, groups: int) -> np.ndarray:
    """Concatenate along axis; with groups > 1, interleave each part's equal chunks group by group."""
    if groups == 1:
        return np.concatenate(parts, axis=axis)
    chunks = [np.split(p, groups, axis=axis) for p in parts]
    return np.concatenate([c[g] for g in range(groups) for c in chunks], axis=axis)


def split_parts(whole: np.ndarray, shapes: tuple[tuple[int, ...], ...], axis: int, groups: int) -> list[np.ndarray]:
    """The inverse of merge_parts: cut `whole` into parts of the given shapes."""
    sizes = [s[axis] // groups for s in shapes]
    bounds = np.cumsum(sizes)[:-1]
    if groups == 1:
        return [np.ascontiguousarray(p) for p in np.split(whole, bounds, axis=axis)]
    per_group = [np.split(g, bounds, axis=axis) for g in np.split(whole, groups, axis=axis)]
    return [np.ascontiguousarray(np.concatenate([pg[i] for pg in per_group], axis=axis)) for i in range(len(shapes))]


def _transposed(slot: PortSlot) -> bool:
    return slot.param_name in TRANSPOSED_BY_TYPE.get(slot.owner_type, frozenset())


_CONVS = ("Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose")
# Port layer type -> parameter names held in the port tensor's own shape (a reshape): Paddle's
# weight norm keeps a convolution's `weight_g` as a vector, torch as (C, 1, ..., 1).
RESHAPED_BY_TYPE: dict[tuple[str, str], frozenset[str]] = {
    ("paddle.nn.layer.conv", name): frozenset({"weight_g"}) for name in _CONVS}
_LAYOUT_TYPES = TRANSPOSED_BY_TYPE.keys() | RESHAPED_BY_TYPE.keys()  # the layer types the layout rules know
# torch's newer weight norm (torch.nn.utils.parametrizations) names Paddle's weight_g/weight_v so.
WEIGHT_NORM_NAMES = {".parametrizations.weight.original0": ".weight_g", ".parametrizations.weight.original1": ".weight_v"}


def _weight_norm_alias(target: str, port: Mapping[str, PortSlot]) -> str | None:
    """Paddle's name for a tensor torch's parametrized weight norm holds, if the port has it."""
    for torch_suffix, paddle_suffix in WEIGHT_NORM_NAMES.items():
        if target.endswith(torch_suffix) and (alias := target[: -len(torch_suffix)] + paddle_suffix) in port:
            return alias
    return None


def _groups(f: Fuse, config: Mapping[str, Any], rules: Rules) -> int:
    if isinstance(f.groups, int):
        return f.groups
    value = config.get(f.groups)
    if not isinstance(value, int) or value < 1:
        raise WeightError(f"{rules.source.name}: {f.describe()}: config has no positive integer {f.groups!r}")
    return value


def plan(rules: Rules, source: Mapping[str, tuple[int, ...]], port: Mapping[str, PortSlot],
         config: Mapping[str, Any] | None = None, same: Callable[[str, str], bool] | None = None,
         strict: bool = True) -> WeightMap:
    """Decide, for every reference tensor, its port tensor(s) and transform, from shapes only.

    Strict (the default): every source key maps somewhere (or is tied or ignored), every port
    tensor is written, nothing twice, shapes agree; the first problem raises WeightError.
    Non-strict: unmapped source keys and unwritten port keys are returned instead (for verify).
    `same(a, b)` checks that two tied reference tensors hold the same bytes.
    """
    config = config or {}
    entries: list[WeightEntry] = []
    written: dict[str, str] = {}
    consumed: set[str] = set()
    unmapped: list[str] = []

    def layout(target: str, key: str, rule: str) -> tuple[PortSlot, bool, str]:
        slot = port.get(target)
        if slot is None:
            raise WeightError(f"{key}: unmapped reference tensor ({rule} gives {target!r}, which the port does not "
                              f"have); add a rename or an ignore rule to {rules.source.name}")
        transposed = _transposed(slot)
        if (override := rules.transpose_override(key)) is not None:
            transposed = override[1]
            rule = f"{rule}, transpose {override[0]!r} = {str(override[1]).lower()}"
        return slot, transposed, rule

    def claim(target: str, key: str, rule: str) -> None:
        if target in written:
            raise WeightError(f"{target}: written twice, from {written[target]!r} and {key!r} ({rule})")
        written[target] = key

    def check_shape(key: str, target: str, shape: tuple[int, ...], slot: PortSlot, transposed: bool, rule: str,
                    permute: tuple[int, ...] = (), reshape: bool = False) -> None:
        what = "transpose" if transposed else "copy"
        if permute:
            if len(permute) != len(shape):
                raise WeightError(f"{key} -> {target}: permute {list(permute)} needs a {len(permute)}-D tensor, got "
                                  f"shape {shape} ({rule})")
            shape, what = tuple(shape[a] for a in permute), f"permute {list(permute)}"
        if reshape:
            if math.prod(shape) != math.prod(slot.shape):
                raise WeightError(f"{key} -> {target}: cannot reshape {shape} ({math.prod(shape)} elements) to the "
                                  f"port's {slot.shape} ({math.prod(slot.shape)}) ({rule})")
            return
        if transposed and len(shape) != 2:
            raise WeightError(f"{key} -> {target}: transpose needs a matrix, got shape {shape} ({rule})")
        out = shape[::-1] if transposed else shape
        if out != slot.shape:
            raise WeightError(f"{key} -> {target}: shape mismatch ({rule}, {what}): "
                              f"reference {shape} gives {out}, port expects {slot.shape}")

    def arrange(key: str, slot: PortSlot, rule: str) -> tuple[tuple[int, ...], bool, str]:
        """The permute and reshape that bring reference tensor `key` into its port slot: from
        the rules by name, or from the port layer's type."""
        permute, reshape = (), False
        if (found := rules.permute_for(key)) is not None:
            permute, rule = found[1], f"{rule}, permute {found[0]!r} = {list(found[1])}"
        if (pattern := rules.reshaped(key)) is not None:
            reshape, rule = True, f"{rule}, reshape {pattern!r}"
        elif slot.param_name in RESHAPED_BY_TYPE.get(slot.owner_type, frozenset()):
            reshape, rule = True, f"{rule}, reshaped: {slot.owner_type[1]}.{slot.param_name} is {list(slot.shape)} in Paddle"
        return permute, reshape, rule

    def fused(key: str) -> bool:
        for f in rules.fuses:
            m = re.fullmatch(f.sources[0], key)
            if not m:
                continue
            groups = _groups(f, config, rules)
            rule = f"{f.describe()} ({rules.source.name})"
            if f.kind == "merge":
                parts = [key] + [_partner(p, m.groups(), source, key, rules) for p in f.sources[1:]]
                target = m.expand(f.targets[0])
                slot, transposed, rule = layout(target, key, rule)
                shapes = tuple(tuple(source[p]) for p in parts)
                whole = list(shapes[0])
                whole[f.axis] = sum(s[f.axis] for s in shapes)
                for p, s in zip(parts, shapes):
                    if s[f.axis] % groups:
                        raise WeightError(f"{p}: {s[f.axis]} along axis {f.axis} does not split into {groups} groups ({rule})")
                check_shape(" + ".join(parts), target, tuple(whole), slot, transposed, rule)
                claim(target, key, rule)
                consumed.update(parts)
                entries.append(WeightEntry(" + ".join(parts), target, tuple(whole), slot.shape, "merge", rule,
                                           transposed, sources=tuple(parts), targets=(target,), axis=f.axis,
                                           groups=groups, part_shapes=shapes))
            else:
                targets = [m.expand(t) for t in f.targets]
                slots, flags = [], set()
                for t in targets:
                    slot, transposed, rule = layout(t, key, rule)
                    slots.append(slot)
                    flags.add(transposed)
                if len(flags) != 1:
                    raise WeightError(f"{key}: split into tensors of different layouts ({', '.join(targets)})")
                transposed = flags.pop()
                shapes = tuple((s.shape[::-1] if transposed else s.shape) for s in slots)
                total = sum(s[f.axis] for s in shapes)
                if total != source[key][f.axis]:
                    raise WeightError(f"{key}: shape mismatch ({rule}): reference {tuple(source[key])} along axis "
                                      f"{f.axis} is {source[key][f.axis]}, the parts {[list(s) for s in shapes]} add up to {total}")
                for t in targets:
                    claim(t, key, rule)
                consumed.add(key)
                entries.append(WeightEntry(key, " + ".join(targets), tuple(source[key]), None, "split", rule,
                                           transposed, sources=(key,), targets=tuple(targets), axis=f.axis,
                                           groups=groups, part_shapes=shapes))
            return True
        return False

    # Fused tensors first: a merge is anchored on its first part, which need not come first
    # in the checkpoint's order (shards list their tensors alphabetically).
    for key in source:
        if key not in consumed and rules.ignored(key) is None:
            try:
                fused(key)
            except WeightError:
                if strict:
                    raise
                unmapped.append(key)
                consumed.add(key)
    for key, shape in source.items():
        shape = tuple(shape)
        if key in consumed:  # a part of a merge or split, planned in the first pass
            continue
        if (pattern := rules.ignored(key)) is not None:
            entries.append(WeightEntry(key, None, shape, None, "ignored", f"ignore {pattern!r}", sources=(key,)))
            continue
        try:
            target, rule = rules.rename(key)
            if target not in port and (alias := _weight_norm_alias(target, port)) is not None:
                target, rule = alias, f"{rule}; weight norm: {target} is Paddle's {alias}"
            slot = port.get(target)
            if slot is None and not strict:
                unmapped.append(key)
                continue
            slot, transposed, rule = layout(target, key, rule)
            if key in rules.tie:
                partner = rules.tie[key]
                if partner not in source:
                    raise WeightError(f"{key}: tied to {partner!r} by {rules.source.name}, but the reference has no {partner!r}")
                if same is not None and not same(key, partner):
                    raise WeightError(f"{key}: tied to {partner!r} by {rules.source.name}, but the reference tensors differ")
                if slot.alias_of is not None:
                    entries.append(WeightEntry(key, target, shape, slot.shape, "tied", f"tie to {partner}",
                                               transposed, sources=(key,), targets=(target,)))
                    continue
            elif slot.alias_of is not None:
                raise WeightError(f"{key} -> {target}: the port shares this tensor with {slot.alias_of!r}, "
                                  f"but {rules.source.name} has no tie for {key!r}")
            permute, reshape, rule = arrange(key, slot, rule)
            claim(target, key, rule)
            check_shape(key, target, shape, slot, transposed, rule, permute, reshape)
            transform = "reshape" if reshape else "permute" if permute else "transpose" if transposed else "copy"
            entries.append(WeightEntry(key, target, shape, slot.shape, transform, rule, transposed, sources=(key,),
                                       targets=(target,), permute=permute, reshape=reshape))
        except WeightError:
            if strict:
                raise
            unmapped.append(key)
    if strict:
        # A rule that matches nothing is a typo or a rule for another model: say which.
        keys = list(source)
        for r in rules.renames:
            if not any(re.fullmatch(r.pattern, k) for k in keys):
                raise WeightError(f"{rules.source.name}: rename {r.pattern!r} matches no reference tensor")
        for f in rules.fuses:
            if not any(re.fullmatch(f.sources[0], k) for k in keys):
                raise WeightError(f"{rules.source.name}: {f.kind} from {f.sources[0]!r} matches no reference tensor")
        for pattern, _ in rules.transpose:
            if not any(re.fullmatch(pattern, k) for k in keys):
                raise WeightError(f"{rules.source.name}: transpose {pattern!r} matches no reference tensor")
    for pattern in rules.computed:
        if not any(re.fullmatch(pattern, k) for k in port):
            raise WeightError(f"{rules.source.name}: computed {pattern!r} matches no port tensor")
    never = sorted(k for k, s in port.items() if s.alias_of is None and k not in written
                   and not rules.computed_by_port(k))
    if never and strict:
        raise WeightError(f"port tensor(s) never written by {rules.source.name}: {', '.join(never)} "
                          f"(reference has no tensor mapping to them)")
    return WeightMap(tuple(entries), tuple(unmapped), tuple(never))


def _partner(pattern: str, captures: tuple, source: Mapping[str, Any], anchor: str, rules: Rules) -> str:
    found = [k for k in source if (m := re.fullmatch(pattern, k)) and m.groups() == captures]
    if len(found) != 1:
        raise WeightError(f"{anchor}: merge in {rules.source.name} needs exactly one reference tensor matching "
                          f"{pattern!r} with captures {list(captures)}, found {len(found)}")
    return found[0]


def build_targets(e: WeightEntry, get: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """The port tensors of one entry, from the reference tensors `get` returns."""
    if e.transform == "merge":
        outs = {e.targets[0]: merge_parts([get(s) for s in e.sources], e.axis, e.groups)}
    elif e.transform == "split":
        outs = dict(zip(e.targets, split_parts(get(e.sources[0]), e.part_shapes, e.axis, e.groups)))
    else:
        return {e.targets[0]: e.to_port(get(e.sources[0]))}
    return {k: np.ascontiguousarray(v.T) if e.transposed else v for k, v in outs.items()}


def build_sources(e: WeightEntry, get: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """The reference tensors of one entry, from the port tensors `get` returns (the inverse)."""
    if e.transform == "merge":
        whole = get(e.targets[0])
        whole = whole.T if e.transposed else whole
        return dict(zip(e.sources, split_parts(whole, e.part_shapes, e.axis, e.groups)))
    if e.transform == "split":
        parts = [get(t).T if e.transposed else get(t) for t in e.targets]
        return {e.sources[0]: merge_parts(parts, e.axis, e.groups)}
    back = e.to_reference(get(e.targets[0]))
    # np.ascontiguousarray would make a 0-d tensor (a scalar parameter) 1-d
    return {e.sources[0]: back if back.flags.c_contiguous else np.ascontiguousarray(back)}


def convert(wmap: WeightMap, source: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The port's state dict (numpy) under the planned transforms."""
    out: dict[str, np.ndarray] = {}
    for e in wmap.written():
        out.update(build_targets(e, source.__getitem__))
    return out


def verify(wmap: WeightMap, source: Mapping[str, np.ndarray], read_back: Callable[[str], np.ndarray],
           strict: bool = True) -> WeightMap:
    """Read each loaded port tensor back and check it is bit-exact with its source under the
    rules. Strict: a mismatch raises; otherwise it is marked exact=False in the map."""
    checked = []
    for e in wmap.entries:
        if e.target is None:
            checked.append(e)
            continue
        if e.transform == "tied":
            expected = {e.targets[0]: e.to_port(source[e.sources[0]])}
        else:
            expected = build_targets(e, source.__getitem__)
        exact = all(same_bytes(read_back(t), arr) for t, arr in expected.items())
        checked.append(WeightEntry(**{**asdict(e), "exact": exact}))
    result = WeightMap(tuple(checked), wmap.unmapped, wmap.unwritten)
    bad = [e for e in result.entries if e.exact is False]
    if bad and strict:
        names = ", ".join(f"{e.source} -> {e.target}" for e in bad)
        raise WeightError(f"loaded port tensor(s) differ from their source: {names}")
    return result


def same_bytes(a: np.ndarray, b: np.ndarray, chunk: int = 1 << 24) -> bool:
    """Bit-exact equality, compared in slices: a 2.4 GB embedding is not copied to bytes."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    av = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    bv = np.ascontiguousarray(b).reshape(-1).view(np.uint8)
    return all(np.array_equal(av[i:i + chunk], bv[i:i + chunk]) for i in range(0, av.size, chunk))


def _layout_type(cls: type) -> tuple[str, str]:
    """The (module, name) the layout rules know a layer by: its own class, or the nearest base
    they know (a port's own subclass of paddle.nn.Linear stores [in, out] as its base does)."""
    return next(((k.__module__, k.__name__) for k in cls.__mro__ if (k.__module__, k.__name__) in _LAYOUT_TYPES),
                (cls.__module__, cls.__name__))


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
            owner_type=_layout_type(type(owner)),
            param_name=attr,
            alias_of=None if alias == key else alias,
        )
    return slots


def render_rules(port_slots: Mapping[str, PortSlot], header: str) -> str:
    """A rules file written out from a port's structure: one explicit transpose line per
    tensor whose layout the port's layer type decides, ready to edit by hand."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += ["", "# Layouts from the port's layer types (true: the port stores it transposed).", "[transpose]"]
    for key, slot in port_slots.items():
        if slot.alias_of is None and len(slot.shape) == 2:
            lines.append(f"'{re.escape(key)}' = {str(_transposed(slot)).lower()}")  # a TOML literal string
    return "\n".join(lines) + "\n"

