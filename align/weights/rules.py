"""Weight rules: weights/<model>.toml, parsed and validated.

A rules file (weights/<model>.toml) holds:
- `[[rename]]`: `from` regex with captures -> `to`; first match wins; unmatched names stay.
  Renames also map module paths for pairing, so write them to match both.
- `[module_rename]`: "regex" = "replacement" for module paths only (a parameter-less module
  the port names differently, such as Phi3's `mlp.activation_fn` as `mlp.act_fn`).
- `[tie]`: reference key = the key it shares storage with.
- `ignore`: regexes of reference tensors the port does not hold.
- `computed`: regexes of port tensors the port computes itself and saves (a persistable index
  buffer the reference keeps out of its state dict); never written, judged by what they do.
- `[[merge]]`: several reference tensors (regexes that match with the same captures) ->
  one fused port tensor, concatenated along `axis`; with `groups` (an int or a config key
  such as "num_key_value_heads") each source is cut into that many equal chunks and the
  chunks are interleaved group by group: the per-KV-head grouped qkv layout.
- `[[split]]`: one fused reference tensor -> several port tensors, the inverse.
- `[transpose]`: "regex" = true/false, overriding the layer type by name.
- `keep_fp32`: regexes of tensors that stay fp32 when a checkpoint is cast.
- `[unpaired]`: "regex" = "reason": modules with no counterpart on the other side by design
  (a reference q_proj once q, k and v are fused; a port's separate loss layer). They are
  reported with the reason and do not fail.
- `[permute]`: "regex" = [axes]: the port holds the reference tensor with its axes permuted
  (port = ref.transpose(axes)), N-D; gradients come back by the inverse permutation.
- `[reshape]`: "regex" = true: the port holds the reference tensor in the port tensor's own
  shape (same elements, same order; after any permute): squeezes and unsqueezes.
Both are also decided by the port layer's type where Paddle stores a tensor another way
(plan.LAYOUT_BY_TYPE): a weight-normed layer's `weight_g` is a vector in Paddle, (C, 1, 1) in
torch. torch's `parametrizations.weight.original0/1` map to Paddle's `weight_g`/`weight_v`.

"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.errors import ConfigError

# Port layer type (module path, class name) -> parameter names stored transposed vs torch.
TRANSPOSED_BY_TYPE: dict[tuple[str, str], frozenset[str]] = {
    ("paddle.nn.layer.common", "Linear"): frozenset({"weight"}),
}


@dataclass(frozen=True)
class Rename:
    pattern: str
    replacement: str

    def apply(self, key: str) -> str | None:
        m = re.fullmatch(self.pattern, key)
        return m.expand(self.replacement) if m else None


@dataclass(frozen=True)
class Fuse:
    """A merge (many sources -> one target) or a split (one source -> many targets)."""

    kind: str  # "merge" or "split"
    sources: tuple[str, ...]  # regexes (merge) or one regex (split)
    targets: tuple[str, ...]  # one template (merge) or templates (split)
    axis: int
    groups: int | str  # 1, an int, or a config key

    def describe(self) -> str:
        g = f", grouped by {self.groups}" if self.groups != 1 else ""
        return f"{self.kind} along axis {self.axis}{g}"


@dataclass(frozen=True)
class Rules:
    source: Path
    renames: tuple[Rename, ...]
    tie: dict[str, str]  # reference key -> the reference key it shares storage with
    ignore: tuple[str, ...]  # regexes over reference keys that the port does not hold
    transpose: tuple[tuple[str, bool], ...] = ()  # explicit layout by name, overriding the layer type
    fuses: tuple[Fuse, ...] = ()
    keep_fp32: tuple[str, ...] = ()
    unpaired: tuple[tuple[str, str], ...] = ()  # (regex over module paths, reason)
    module_renames: tuple[Rename, ...] = ()  # module paths only, tried before `renames`
    permutes: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (regex over reference keys, axes)
    reshapes: tuple[str, ...] = ()  # regexes over reference keys held in the port tensor's shape
    computed: tuple[str, ...] = ()  # regexes over port keys the port computes itself (an index buffer)

    def rename_module(self, name: str) -> tuple[str, str]:
        """(port module path, the rule that produced it) for a reference module path."""
        for r in self.module_renames:
            out = r.apply(name)
            if out is not None:
                return out, f"module_rename {r.pattern!r} -> {r.replacement!r}"
        return self.rename(name)

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

    def stays_fp32(self, key: str) -> bool:
        return any(re.fullmatch(p, key) for p in self.keep_fp32)

    def permute_for(self, key: str) -> tuple[str, tuple[int, ...]] | None:
        return next(((p, axes) for p, axes in self.permutes if re.fullmatch(p, key)), None)

    def reshaped(self, key: str) -> str | None:
        return next((p for p in self.reshapes if re.fullmatch(p, key)), None)

    def computed_by_port(self, port_key: str) -> bool:
        return any(re.fullmatch(p, port_key) for p in self.computed)

    def unpaired_reason(self, module: str) -> str | None:
        found = next((reason for p, reason in self.unpaired if re.fullmatch(p, module)), None)
        if found is None and re.fullmatch(r"(.+\.)?parametrizations(\..+)?", module):
            return "torch's parametrization machinery (weight norm): Paddle computes the weight in a hook"
        return found


RULE_KEYS = ("computed", "ignore", "keep_fp32", "merge", "module_rename", "permute", "rename", "reshape", "split", "tie",
             "transpose", "unpaired")


def _regex(path: Path, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, key, f"expected a regex string, got {value!r}")
    try:
        re.compile(value)
    except re.error as e:
        raise ConfigError(path, key, f"bad regex {value!r}: {e}") from None
    return value


def _string_table(path: Path, data: dict, key: str, kind: type) -> dict:
    table = data.get(key, {})
    if not isinstance(table, dict) or not all(isinstance(v, kind) for v in table.values()):
        what = {str: "a string", bool: "true/false", list: "a list of axes"}[kind]
        raise ConfigError(path, key, f"expected a table of 'regex' = {what}")
    for k in table:
        _regex(path, f"{key}.{k}", k)
    return table


def _fuse(path: Path, kind: str, i: int, t: Any) -> Fuse:
    where = f"{kind}[{i}]"
    if not isinstance(t, dict) or not {"from", "to"} <= set(t) or set(t) - {"from", "to", "axis", "groups"}:
        raise ConfigError(path, where, "expected a table with 'from', 'to' and optional 'axis', 'groups'")
    many, one = ("from", "to") if kind == "merge" else ("to", "from")
    if not isinstance(t[many], list) or len(t[many]) < 2 or not isinstance(t[one], str):
        raise ConfigError(path, f"{where}.{many}", f"a {kind} needs '{many}' as a list of 2+ and '{one}' as one string")
    sources = tuple(_regex(path, f"{where}.from", s) for s in (t["from"] if kind == "merge" else [t["from"]]))
    targets = tuple(t["to"] if kind == "split" else [t["to"]])
    axis, groups = t.get("axis", 0), t.get("groups", 1)
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise ConfigError(path, f"{where}.axis", f"expected an integer, got {axis!r}")
    if not (isinstance(groups, str) or (isinstance(groups, int) and groups >= 1)):
        raise ConfigError(path, f"{where}.groups", f"expected a positive integer or a config key, got {groups!r}")
    return Fuse(kind, sources, targets, axis, groups)


def load_rules(path: Path | None) -> Rules:
    """Parse weights/<model>.toml; errors name the file and key. None (a model whose registry
    entry names no rules file): no rules, every tensor keeps its name."""
    if path is None:
        return Rules(Path("(no weights file)"), (), {}, ())
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(path, "", "no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "", f"not valid TOML: {e}") from None
    unknown = sorted(set(data) - set(RULE_KEYS))
    if unknown:
        raise ConfigError(path, unknown[0], f"unknown key (expected one of: {', '.join(RULE_KEYS)})")
    renames = []
    for i, r in enumerate(data.get("rename", [])):
        if not isinstance(r, dict) or set(r) != {"from", "to"}:
            raise ConfigError(path, f"rename[{i}]", "expected a table with exactly 'from' and 'to'")
        renames.append(Rename(_regex(path, f"rename[{i}].from", r["from"]), r["to"]))
    tie = data.get("tie", {})
    if not isinstance(tie, dict) or not all(isinstance(v, str) for v in tie.values()):
        raise ConfigError(path, "tie", "expected a table of 'key' = 'key it is tied to'")
    lists = {}
    for key in ("computed", "ignore", "keep_fp32"):
        value = data.get(key, [])
        if not isinstance(value, list):
            raise ConfigError(path, key, "expected an array of regexes")
        lists[key] = tuple(_regex(path, f"{key}[{i}]", v) for i, v in enumerate(value))
    fuses = [_fuse(path, kind, i, t) for kind in ("merge", "split") for i, t in enumerate(data.get(kind, []))]
    module_renames = tuple(Rename(k, v) for k, v in _string_table(path, data, "module_rename", str).items())
    permutes = []
    for pattern, axes in _string_table(path, data, "permute", list).items():
        if sorted(axes) != list(range(len(axes))) or not all(isinstance(a, int) for a in axes):
            raise ConfigError(path, f"permute.{pattern}", f"expected a permutation of 0..{len(axes) - 1}, got {axes!r}")
        permutes.append((pattern, tuple(axes)))
    reshapes = tuple(k for k, v in _string_table(path, data, "reshape", bool).items() if v)
    return Rules(path, tuple(renames), dict(tie), lists["ignore"],
                 tuple(_string_table(path, data, "transpose", bool).items()), tuple(fuses), lists["keep_fp32"],
                 tuple(_string_table(path, data, "unpaired", str).items()), module_renames, tuple(permutes), reshapes,
                 lists["computed"])
