"""align.toml -> Registry: parsing and validation.

Every read is type-checked and every key not read is an error, so a typo is reported in
milliseconds with the file and the dotted key, before any framework loads.
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any

from align.errors import ConfigError
from align.registry.inputs import parse_inputs
from align.registry.spec import (
    Bf16Policy,
    InitRecipe,
    ModelSpec,
    NoiseFloor,
    Override,
    PortVariant,
    Registry,
    Tolerance,
)

DTYPES = ("float32", "bfloat16")


class _Table:
    """One TOML table with its dotted path; every read is type-checked and remembered,
    so that whatever was not read can be reported as an unknown key."""

    def __init__(self, file: Path, path: str, data: Any):
        if not isinstance(data, dict):
            raise ConfigError(file, path, f"expected a table, got {_type_name(data)}")
        self.file, self.path, self.data, self.read = file, path, data, set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        self.read.add(name)
        if name not in self.data:
            if default is ...:
                raise ConfigError(self.file, self.key(name), "missing key")
            return default
        value = self.data[name]
        if not _is(value, kind):
            raise ConfigError(
                self.file, self.key(name), f"expected {_kind_name(kind)}, got {_type_name(value)} {value!r}"
            )
        return float(value) if kind is float else value

    def table(self, name: str, default: Any = ...) -> _Table:
        self.read.add(name)
        if name not in self.data:
            if default is ...:
                raise ConfigError(self.file, self.key(name), "missing table")
            return _Table(self.file, self.key(name), default)
        return _Table(self.file, self.key(name), self.data[name])

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.read)
        if unknown:
            expected = ", ".join(sorted(self.read))
            raise ConfigError(self.file, self.key(unknown[0]), f"unknown key (expected one of: {expected})")


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):  # TOML booleans are not numbers
        return bool in kinds
    if float in kinds and isinstance(value, int):
        return True
    return isinstance(value, kinds)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean",
                        "list": "an array", "dict": "a table"}[k.__name__] for k in kinds)


def _type_name(value: Any) -> str:
    return _kind_name(type(value)) if type(value) in (str, int, float, bool, list, dict) else type(value).__name__


def _number(t: _Table, name: str, default: Any = ..., above: float | None = None) -> float:
    """A finite number >= 0 (> `above` if given): an infinite or NaN allowance passes anything."""
    value = t.get(name, float, default)
    if not math.isfinite(value) or value < 0 or (above is not None and not value > above):
        bound = f"> {above:g}" if above is not None else ">= 0"
        raise ConfigError(t.file, t.key(name), f"must be a finite number {bound}, got {value!r}")
    return value


def _tolerance(t: _Table, done: bool = True) -> Tolerance:
    tol = Tolerance(_number(t, "atol"), _number(t, "rtol"))
    if done:
        t.done()
    return tol


def _bf16(t: _Table) -> Bf16Policy:
    policy = Bf16Policy(_number(t, "factor", above=0.0), _number(t, "floor"))
    t.done()
    return policy


def _class_ref(t: _Table, name: str) -> str:
    value = t.get(name, str)
    if value.count(":") != 1 or not all(value.split(":")):
        raise ConfigError(t.file, t.key(name), f"expected 'module:Class', got {value!r}")
    return value


def _constructor(t: _Table) -> tuple[str, str | None]:
    """(target, config class) of a [reference] or [port] table: `class` with `config_class`
    (built from a config object), `class` alone, or `builder` (called with the config's values
    as keyword arguments, returning the module)."""
    if "builder" in t.data:
        if "class" in t.data or "config_class" in t.data:
            raise ConfigError(t.file, t.key("builder"), "give either a builder or a class (with its config_class)")
        return _class_ref(t, "builder"), None
    return _class_ref(t, "class"), (_class_ref(t, "config_class") if "config_class" in t.data else None)


def _dtypes(t: _Table, default: tuple[str, ...]) -> tuple[str, ...]:
    values = t.get("dtypes", list, list(default))
    for v in values:
        if v not in DTYPES:
            raise ConfigError(t.file, t.key("dtypes"), f"unknown dtype {v!r} (known: {', '.join(DTYPES)})")
    if not values:
        raise ConfigError(t.file, t.key("dtypes"), "empty: name at least one dtype")
    return tuple(values)


def _choice(t: _Table, name: str, choices: tuple[str, ...], default: str) -> str:
    value = t.get(name, str, default)
    if value not in choices:
        raise ConfigError(t.file, t.key(name), f"unknown value {value!r} (known: {', '.join(choices)})")
    return value


def _call_kwargs(port: _Table) -> dict[str, dict[str, Any]]:
    """[port.call_kwargs]: module glob ("<root>", "model.layers.*.self_attn") -> keywords."""
    table = port.get("call_kwargs", dict, {})
    for glob, kwargs in table.items():
        if not isinstance(kwargs, dict):
            raise ConfigError(port.file, f"{port.key('call_kwargs')}.{glob}",
                              f"expected a table of keyword arguments, got {kwargs!r}")
    return {glob: dict(kwargs) for glob, kwargs in table.items()}


PORT_VARIANT_NAMES = ("converted",)


def _ports(file: Path, t: _Table, reference_config_class: str | None) -> dict[str, PortVariant]:
    """[models.NAME.ports.VARIANT] tables; "hand" is the [port] table itself."""
    ports_t = t.table("ports", {})
    variants = {}
    for vname in list(ports_t.data):
        if vname not in PORT_VARIANT_NAMES:
            raise ConfigError(file, ports_t.key(vname), f"unknown port variant (known: {', '.join(PORT_VARIANT_NAMES)})")
        v = ports_t.table(vname)
        source = v.get("source", str)
        if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", source):
            raise ConfigError(file, v.key("source"), f"expected a dotted module name, got {source!r}")
        class_name = v.get("class", str)
        if not class_name.isidentifier():
            raise ConfigError(file, v.key("class"), f"expected a class name in the generated module, got {class_name!r}")
        weights = v.get("weights", str, None)  # none: a module without weights, or names the port keeps
        weights_file = (file.parent / weights).resolve() if weights else None
        if weights_file is not None and not weights_file.is_file():
            raise ConfigError(file, v.key("weights"), f"no such file: {weights}")
        variants[vname] = PortVariant(
            name=vname, source=source, class_name=class_name,
            config_class=_class_ref(v, "config_class") if "config_class" in v.data else reference_config_class,
            weights_file=weights_file, call_kwargs=_call_kwargs(v),
            labels=_choice(v, "labels", ("as_reference", "shifted"), "as_reference"))
        v.done()
    ports_t.done()
    return variants


def _model(file: Path, name: str, t: _Table, defaults: dict[str, Any]) -> ModelSpec:
    ref = t.table("reference")
    # A model may have only generated ports ([ports.converted]) and no hand port yet.
    port = t.table("port", {} if "ports" in t.data else ...)
    init = t.table("init", {})
    spec_init = InitRecipe(seed=init.get("seed", int, 0), std=init.get("std", float, 0.0))
    if not spec_init.std >= 0:
        raise ConfigError(file, init.key("std"), f"must be >= 0, got {spec_init.std!r}")
    spec_inputs = parse_inputs(t.table("inputs"))
    configs_t = t.table("configs")
    configs: dict[str, dict[str, Any] | str] = {}
    for cname, value in configs_t.data.items():
        configs[cname] = value if isinstance(value, str) else dict(configs_t.table(cname).data)
        configs_t.read.add(cname)
    configs_t.done()
    if not configs:
        raise ConfigError(file, configs_t.path, "no configs: add at least [models.NAME.configs.tiny]")
    default_config = t.get("default_config", str, "tiny")
    if default_config not in configs:
        raise ConfigError(file, t.key("default_config"), f"no config {default_config!r} (known: {', '.join(configs)})")
    checkpoints_t = t.table("checkpoints", {})
    checkpoints = {}
    for cname in list(checkpoints_t.data):
        if cname not in configs:
            raise ConfigError(file, checkpoints_t.key(cname), f"no config {cname!r} (known: {', '.join(configs)})")
        checkpoints[cname] = checkpoints_t.get(cname, str)
    checkpoints_t.done()

    tol_t = t.table("tolerance", {})
    if "float32" in tol_t.data:
        fp32 = tol_t.table("float32")
        tolerance, factor = _tolerance(fp32, done=False), _number(fp32, "factor", defaults["factor"], above=0.0)
        fp32.done()
    else:
        tolerance, factor = defaults["float32"], defaults["factor"]
    bf16 = _bf16(tol_t.table("bfloat16")) if "bfloat16" in tol_t.data else defaults["bfloat16"]
    # The float64 truth judges what the literal rule fails, unless the model has no float64
    # path (an op without a float64 kernel): then the literal rule alone, said so in the report.
    strict = tol_t.get("strict", bool, False)
    float64 = tol_t.get("float64", (bool, str), True)
    if isinstance(float64, str) and float64 != "through-casts":
        raise ConfigError(file, tol_t.key("float64"), f"expected true, false or \"through-casts\", got {float64!r}")
    noise_floor = NoiseFloor(factor, strict, through_casts=float64 == "through-casts") if float64 else None
    overrides = []
    for i, o in enumerate(tol_t.get("overrides", list, [])):
        o_t = _Table(file, f"{tol_t.key('overrides')}[{i}]", o)
        glob = o_t.get("glob", str)
        overrides.append(Override(glob, _tolerance(_Table(file, o_t.path, {k: v for k, v in o.items() if k != "glob"}))))
    tol_t.done()

    stream_t = t.table("stream", {})
    stream_blocks = stream_t.get("blocks", str, None)
    stream_t.done()

    hand_port = "port" in t.data or "ports" not in t.data
    ref_class, ref_config = _constructor(ref)
    port_class, port_config = _constructor(port) if hand_port else ("", None)
    attn = ref.get("attn_implementation", str, None)
    if attn is not None and ref_config is None:
        raise ConfigError(file, ref.key("attn_implementation"), "applies to a class built from a config_class only")
    ports = _ports(file, t, ref_config)
    weights = t.get("weights", str, None)
    # Without a hand port, the model-level rules are the first generated port's own.
    weights_file = ((file.parent / weights).resolve() if weights
                    else next(iter(ports.values())).weights_file if ports and not hand_port else None)
    if weights_file is not None and not weights_file.is_file():
        raise ConfigError(file, t.key("weights"), f"no such file: {weights}")

    spec = ModelSpec(
        name=name,
        description=t.get("description", str, ""),
        ci=t.get("ci", bool, False),
        source=file,
        weights_file=weights_file,
        reference_class=ref_class,
        reference_config_class=ref_config,
        attn_implementation=attn,
        port_class=port_class,
        port_config_class=port_config,
        init=spec_init,
        inputs=spec_inputs,
        configs=configs,
        dtypes=_dtypes(t, defaults["dtypes"]),
        tolerance=tolerance,
        bf16=bf16,
        noise_floor=noise_floor,
        overrides=tuple(overrides),
        default_config=default_config,
        checkpoints=checkpoints,
        port_environment=port.get("environment", str, None),
        port_call_kwargs=_call_kwargs(port),
        port_labels=_choice(port, "labels", ("as_reference", "shifted"), "as_reference"),
        ports=ports,
        stream_blocks=stream_blocks,
    )
    for sub in (ref, port, init):
        sub.done()
    t.done()
    return spec


def load_registry(path: Path | str) -> Registry:
    """Parse and validate align.toml. Raises ConfigError naming the file and key."""
    file = Path(path).resolve()
    try:
        data = tomllib.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(file, "", "no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(file, "", f"not valid TOML: {e}") from None
    top = _Table(file, "", data)
    d = top.table("defaults")
    d_tol = d.table("tolerance")
    d_fp32 = d_tol.table("float32")
    defaults = {
        "dtypes": _dtypes(d, DTYPES),
        "float32": _tolerance(d_fp32, done=False),
        "factor": _number(d_fp32, "factor", 2.0, above=0.0),
        "bfloat16": _bf16(d_tol.table("bfloat16")),
    }
    d_fp32.done()
    d_tol.done()
    d.done()
    models_t = top.table("models")
    models = {name: _model(file, name, models_t.table(name), defaults) for name in models_t.data}
    models_t.done()
    top.done()
    return Registry(file, models)


def find_registry(start: Path | None = None) -> Path:
    """The nearest align.toml at or above `start` (default: the working directory)."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "align.toml").is_file():
            return d / "align.toml"
    raise ConfigError(here / "align.toml", "", "no align.toml here or in any parent directory")
