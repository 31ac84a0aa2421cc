"""align.toml -> frozen ModelSpec.

This module never imports torch or paddle: a registry typo must be reported in
milliseconds, with the file and the dotted key, before any framework loads.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.errors import ConfigError


@dataclass(frozen=True)
class Tolerance:
    """Elementwise allowance |port - ref| <= atol + rtol * |ref|."""

    atol: float
    rtol: float

    def describe(self) -> str:
        return f"|port - ref| <= {self.atol:g} + {self.rtol:g} * |ref| elementwise; NaN/Inf never pass"


@dataclass(frozen=True)
class Bf16Policy:
    """The port's bf16 error vs fp32 ref may not exceed max(factor * ref's own bf16 error, floor)."""

    factor: float
    floor: float

    def describe(self) -> str:
        return (
            f"port bf16 error vs fp32 reference <= max({self.factor:g} x the reference's own "
            f"bf16 error, {self.floor:g}) elementwise-max; NaN/Inf never pass"
        )


@dataclass(frozen=True)
class NoiseFloor:
    """fp32 judged against a float64 truth: a comparison that fails the literal rule still passes
    when the port's error against the reference run again in float64 is at most `factor` times
    the fp32 reference's own error against it (RMS; see compare.metrics.within_noise). Both
    frameworks round differently in fp32; the question is whether the port is further from the
    exact answer than the reference itself is. `strict`: the literal rule alone decides."""

    factor: float = 2.0
    strict: bool = False
    # the float64 run keeps float64 where the reference casts to float32 on purpose
    # (whisper's LayerNorm: x.float()), see core.reference.float64_through_casts
    through_casts: bool = False

    def describe(self) -> str:
        if self.strict:
            return "strict: the literal rule alone decides (the float64 truth's numbers are reported)"
        return (f"or, failing that, RMS|port - ref_fp64| <= {self.factor:g} x RMS|ref_fp32 - ref_fp64| (+ 1 fp32 "
                f"ulp), its worst element within {4 * self.factor:g} x the reference's: within the reference's "
                "own fp32 noise")


@dataclass(frozen=True)
class Override:
    """A per-module tolerance, addressed by glob over reference module names."""

    glob: str
    tolerance: Tolerance


@dataclass(frozen=True)
class InitRecipe:
    """Seeded random weights: the model's own initialisation, then N(0, std) added to every
    parameter (std 0: the model's own initialisation alone)."""

    seed: int = 0
    std: float = 0.0


@dataclass(frozen=True)
class InputSpec:
    """One named input of the model ([models.NAME.inputs.INPUT]): its kind, the kind's
    parameters (validated by registry.inputs), and how it is handed to the model."""

    name: str
    kind: str  # see registry.inputs.KINDS
    params: dict[str, Any]
    requires_grad: bool = False  # its gradient is judged, as `input:NAME`
    position: int | None = None  # passed positionally at this index; by keyword (its name) otherwise


@dataclass(frozen=True)
class InputsRecipe:
    """What the model is fed and what its backward starts from ([models.NAME.inputs])."""

    seed: int
    tensors: tuple[InputSpec, ...]  # made in this order from one generator seeded by `seed`
    # "projection" (a seeded random projection of every floating output), "loss" (the output
    # named loss), or "output:PATH" (one output, named as the report names it: "logits", "out", "0")
    backward: str = "projection"
    derived: tuple[str, ...] = ()  # 'module:function's of the model's outputs, compared too
    # plain keyword values passed to both forwards as they are (return_loss = true, use_cache = false)
    constants: tuple[tuple[str, Any], ...] = ()

    def split(self, values: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """The inputs as (positional, keyword) arguments, as the model's forward takes them.
        Values not made by this recipe (extra keywords) go by keyword."""
        placed = sorted((t.position, t.name) for t in self.tensors if t.position is not None and t.name in values)
        args = tuple(values[name] for _, name in placed)
        taken = {name for _, name in placed}
        return args, {k: v for k, v in values.items() if k not in taken}

    def with_params(self, name: str, **params: Any) -> InputsRecipe:
        """This recipe with some parameters of input `name` changed (benchmarks and tests
        resize an input this way)."""
        import dataclasses

        return dataclasses.replace(self, tensors=tuple(
            dataclasses.replace(t, params={**t.params, **params}) if t.name == name else t for t in self.tensors))

    def graded(self) -> tuple[str, ...]:
        """The inputs whose gradients are judged."""
        return tuple(t.name for t in self.tensors if t.requires_grad)


@dataclass(frozen=True)
class PortVariant:
    """Another port of the same reference, generated rather than hand-written
    ([models.NAME.ports.VARIANT]): `align convert` writes it, `align run --port VARIANT` aligns it."""

    name: str  # "converted"
    source: str  # the reference's modeling module to convert, e.g. transformers.models.gemma2.modeling_gemma2
    class_name: str  # the port class inside the generated module
    config_class: str | None  # "module:Class"; default: the reference's config class, reused as is
    weights_file: Path | None
    call_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    labels: str = "as_reference"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    ci: bool
    source: Path  # the align.toml this came from
    weights_file: Path | None  # the weight rules (None: no rules file, for a module without weights)
    # "module:attr". With a config class, the class is built from a config object; without one
    # (None), it is a builder: a callable given the config's values that returns the module.
    reference_class: str
    reference_config_class: str | None
    attn_implementation: str | None
    port_class: str
    port_config_class: str | None
    init: InitRecipe
    inputs: InputsRecipe
    configs: dict[str, dict[str, Any] | str]  # a table of values, or the path of a config.json
    dtypes: tuple[str, ...]
    tolerance: Tolerance
    bf16: Bf16Policy
    noise_floor: NoiseFloor | None = None
    overrides: tuple[Override, ...] = field(default=())
    default_config: str = "tiny"
    checkpoints: dict[str, str] = field(default_factory=dict)  # config name -> its checkpoint
    port_environment: str | None = None  # a virtual environment (dir) the port must run in, apart from torch
    port_call_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # module glob -> extra keywords
    port_labels: str = "as_reference"  # or "shifted": the port's loss expects next-token labels already shifted
    ports: dict[str, PortVariant] = field(default_factory=dict)  # generated ports beside the hand port
    stream_blocks: str | None = None  # [stream] blocks: the reference's block list, for --stream-layers

    @property
    def root(self) -> Path:
        return self.source.parent

    @property
    def judging(self) -> str:
        """Which rule judges fp32: "float64" (the literal rule, then the float64 truth),
        "strict" (the literal rule alone, the truth's numbers reported) or "literal" (no
        float64 path: the literal rule alone, nothing else consulted)."""
        if self.noise_floor is None:
            return "literal"
        return "strict" if self.noise_floor.strict else "float64"

    def checkpoint_for(self, config: str) -> Path | None:
        """The checkpoint [checkpoints] names for `config`, if any (what a run loads when no
        --checkpoint is given)."""
        return resolve_path(self.checkpoints[config], self.source) if config in self.checkpoints else None


@dataclass(frozen=True)
class Registry:
    source: Path
    models: dict[str, ModelSpec]

    def get(self, name: str) -> ModelSpec:
        if name not in self.models:
            known = ", ".join(sorted(self.models)) or "none"
            raise ConfigError(self.source, f"models.{name}", f"unknown model (known: {known}; see `align list`)")
        return self.models[name]


def read_json(path: Path, missing: str) -> Any:
    """A JSON file the user names (a config.json, a list of module paths): its value, or a
    ConfigError naming the file (`missing`: what to say when there is none)."""
    import json

    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(path, "", missing) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(path, "", f"not valid JSON: {e}") from None


def resolve_path(value: str, base: Path) -> Path:
    """A path from align.toml: relative to the file, or `pkg:module/inner/path` inside an
    installed package (found without importing it)."""
    if value.startswith("pkg:"):
        import importlib.util

        module, _, inner = value[4:].partition("/")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise ConfigError(base, "", f"{value}: no installed package {module!r}")
        return Path(list(found.submodule_search_locations)[0]) / inner
    return (base.parent / value).resolve() if not Path(value).is_absolute() else Path(value)


def matches(name: str, globs: tuple[str, ...]) -> bool:
    """Whether a module or parameter name matches any of the globs (fnmatch, case-sensitive)."""
    import fnmatch

    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def unmatched(globs: tuple[str, ...], names: Iterable[str]) -> str | None:
    """The first glob that matches none of `names`, if any. Every glob a user gives (--only,
    --keep, a tolerance override) must match something: one that matches nothing is a typo,
    and left silent it would narrow or loosen nothing while seeming to."""
    names = list(names)
    return next((g for g in globs if not any(matches(n, (g,)) for n in names)), None)


def require_matching(spec: ModelSpec, flag: str, globs: tuple[str, ...], modules: Iterable[str]) -> None:
    """Refuse a `flag` (--only, --keep) glob that matches no module of the reference."""
    bad = unmatched(globs, modules)
    if bad is not None:
        raise ConfigError(spec.source, f"models.{spec.name}", f"{flag} {bad} matches no module of the reference")


def port_variant_of(port_class: str) -> str | None:
    """The variant a report's `port` ("align_converted.gemma2:Gemma2ForCausalLM") names; None
    for a hand port."""
    module = port_class.partition(":")[0]
    head, dot, _ = module.partition(".")
    return head[len("align_"):] if dot and head.startswith("align_") else None
