"""The model's inputs from its recipe (registry.inputs), framework-free (numpy) and seeded:
identical bytes in both frameworks. Also how the port takes them (labels shifted, extra
keywords).

Inputs are made in the recipe's order from one generator seeded by the recipe's seed, so
an input's bytes depend only on the inputs declared before it.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from align.capture.structure import Feed
from align.capture.trace import Arr
from align.errors import ConfigError
from align.registry.spec import InputSpec, ModelSpec, resolve_path

IGNORE_INDEX = -100


@dataclass
class RecipeContext:
    """What an input builder (kind = "builder") is given, besides its own args."""

    spec: ModelSpec
    rng: np.random.Generator  # the recipe's generator: draw from it, in order, for seeded values
    config: dict[str, Any]  # the model config's values
    made: dict[str, Arr] = field(default_factory=dict)  # the inputs made before this one

    def path(self, value: str) -> Path:
        """A path from align.toml: relative to it, or pkg:module/inner inside an installed package."""
        return resolve_path(value, self.spec.source)

    def fail(self, name: str, message: str) -> ConfigError:
        """The error to raise for input `name` (names the registry key)."""
        return ConfigError(self.spec.source, f"models.{self.spec.name}.inputs.{name}", message)


def make_inputs(spec: ModelSpec, config: dict[str, Any]) -> dict[str, Arr]:
    """Every input of the model's recipe, in order, as framework-free arrays."""
    ctx = RecipeContext(spec, np.random.default_rng(spec.inputs.seed), config)
    for t in spec.inputs.tensors:
        made = _MAKERS[t.kind](ctx, t, _Params(ctx, t))
        arrays = made if isinstance(made, dict) else {t.name: made}
        for name, arr in arrays.items():
            ctx.made[name] = _arr(ctx, t.name, name, arr, t.requires_grad)
    return ctx.made


def feed(fw: Any, spec: ModelSpec, values: dict[str, Arr], extra: dict[str, Any] | None = None,
         arg_names: tuple[str, ...] = ()) -> Feed:
    """The inputs as fresh tensors of framework `fw`, split as the model's forward takes them
    (the recipe's positions; `extra` keywords added): each input with requires_grad a leaf
    that gathers its gradient, in Feed.leaves under the reference's name for it (see
    reference_names; `arg_names`: the reference forward's positional parameter names)."""
    tensors = {k: fw.tensor(a, a.requires_grad) for k, a in values.items()}
    args, kwargs = spec.inputs.split(tensors)
    names = reference_names(spec, arg_names)
    return Feed(args, {**kwargs, **dict(spec.inputs.constants), **(extra or {})},
                {names.get(k, k): tensors[k] for k, a in values.items() if a.requires_grad})


def reference_names(spec: ModelSpec, arg_names: tuple[str, ...]) -> dict[str, str]:
    """Recipe input name -> the name the reference's forward knows it by: its keyword, or for
    an input passed by position, that parameter's name (`arg_names`)."""
    return {t.name: (arg_names[t.position] if t.position < len(arg_names) else f"args[{t.position}]")
            for t in spec.inputs.tensors if t.position is not None}


def call_kwargs(spec: ModelSpec, module: str) -> dict[str, Any]:
    """The extra keywords the registry asks for when calling this (reference-named) module."""
    out: dict[str, Any] = {}
    for glob, kwargs in spec.port_call_kwargs.items():
        if fnmatch.fnmatchcase(module, glob):
            out.update(kwargs)
    return out


def inputs_for_port(values: dict[str, Any], spec: ModelSpec) -> dict[str, Any]:
    """The model inputs as the port takes them. With port.labels = "shifted", causal-LM labels
    are handed over already shifted (position t holds the label of t + 1), for ports whose
    loss does not shift them itself; both sides then score the same targets."""
    labels = values.get("labels")
    if spec.port_labels != "shifted" or not isinstance(labels, Arr):
        return values
    shifted = np.concatenate([labels.data[:, 1:], np.full_like(labels.data[:, :1], IGNORE_INDEX)], axis=1)
    return {**values, "labels": Arr(shifted, labels.dtype)}


class _Params:
    """One input's parameters, with dimensions that name config keys read from the config."""

    def __init__(self, ctx: RecipeContext, t: InputSpec):
        self.ctx, self.t = ctx, t

    def __getitem__(self, key: str) -> Any:
        return self.t.params[key]

    def dim(self, key: str, value: Any = ...) -> int:
        value = self.t.params[key] if value is ... else value
        if isinstance(value, str):  # a config key; a dotted one reaches into a nested config
            found: Any = self.ctx.config
            for part in value.split("."):
                found = found.get(part) if isinstance(found, dict) else None
            if not isinstance(found, int) or isinstance(found, bool):
                raise self.ctx.fail(f"{self.t.name}.{key}", f"{value!r} is not an integer of the model's config "
                                                            f"(it has {found!r})")
            value = found
        if value < 0:
            raise self.ctx.fail(f"{self.t.name}.{key}", f"must be >= 0, got {value}")
        return value

    def shape(self, key: str = "shape") -> tuple[int, ...]:
        return tuple(self.dim(key, d) for d in self.t.params[key])


def _arr(ctx: RecipeContext, table: str, name: str, arr: Any, requires_grad: bool) -> Arr:
    arr = np.ascontiguousarray(arr)
    kinds = {"f": "float", "i": "int", "u": "int", "b": "bool", "c": "complex"}
    if arr.dtype.kind not in kinds or arr.dtype == np.float16:
        raise ctx.fail(table, f"{name}: an input must be a float32/64, integer, bool or complex array, got {arr.dtype}")
    if requires_grad and arr.dtype.kind not in "fc":
        raise ctx.fail(table, f"{name}: requires_grad on a {arr.dtype} array")
    return Arr(arr, arr.dtype.name, requires_grad)


def _tokens(ctx: RecipeContext, t: InputSpec, p: _Params) -> np.ndarray:
    batch, seq_len, vocab = p.dim("batch"), p.dim("seq_len"), p.dim("vocab")
    left_pad = p["left_pad"]
    if left_pad and (len(left_pad) != batch or not all(n < seq_len for n in left_pad)):
        raise ctx.fail(f"{t.name}.left_pad", f"expected {batch} integers in [0, {seq_len}) (one per sample), "
                                             f"got {left_pad!r}")
    pad = p.dim("pad_id") if p["pad_id"] is not None else (ctx.config.get("pad_token_id") or 0)
    ids = ctx.rng.integers(0, vocab, size=(batch, seq_len), dtype=np.int64)
    for b, n in enumerate(left_pad):
        ids[b, :n] = pad
    return ids


def _padding(ctx: RecipeContext, t: InputSpec) -> np.ndarray:
    """1 for the real tokens of the tokens input t.params["of"], 0 for its padding."""
    of = t.params["of"]
    source = next((x for x in ctx.spec.inputs.tensors if x.name == of), None)
    if source is None or source.kind != "tokens":
        raise ctx.fail(f"{t.name}.of", f"{of!r} is not a tokens input")
    mask = np.ones(ctx.made[of].data.shape, dtype=np.int64)
    for b, n in enumerate(source.params["left_pad"]):
        mask[b, :n] = 0
    return mask


def _labels(ctx: RecipeContext, t: InputSpec, p: _Params) -> np.ndarray:
    ids, mask = ctx.made[p["of"]].data, _padding(ctx, t)
    if p["task"] == "causal_lm":
        return np.where(mask == 1, ids, IGNORE_INDEX).astype(np.int64)
    # About a `fraction` of the real tokens carry a label; the rest (and all padding) are ignored.
    chosen = (ctx.rng.random(ids.shape) < p["fraction"]) & (mask == 1)
    return np.where(chosen, ids, IGNORE_INDEX).astype(np.int64)


def _float(ctx: RecipeContext, t: InputSpec, p: _Params) -> np.ndarray:
    shape = p.shape()
    if p["distribution"] == "normal":
        values = ctx.rng.normal(p["mean"], p["std"], size=shape)
    else:
        values = ctx.rng.uniform(p["low"], p["high"], size=shape)
    return values.astype(p["dtype"])


def _audio(ctx: RecipeContext, t: InputSpec, p: _Params) -> np.ndarray:
    """A few tones of random pitch, level and phase plus noise, peaking at 0.9; or, `like`
    another audio input, that input plus `perturbation` times noise (clipped to [-1, 1])."""
    if p["like"] is not None:
        base = ctx.made[p["like"]].data
        return np.clip(base + p["perturbation"] * ctx.rng.standard_normal(base.shape), -1.0, 1.0).astype(np.float32)
    batch, channels, samples, rate = p.dim("batch"), p.dim("channels"), p.dim("samples"), p.dim("sample_rate")
    time = np.arange(samples) / rate
    tones = p["tones"]
    freqs = np.exp(ctx.rng.uniform(math.log(60.0), math.log(rate / 4), size=(batch, channels, tones, 1)))
    levels = ctx.rng.uniform(0.2, 1.0, size=(batch, channels, tones, 1))
    phases = ctx.rng.uniform(0, 2 * math.pi, size=(batch, channels, tones, 1))
    signal = (levels * np.sin(2 * math.pi * freqs * time + phases)).sum(axis=2)
    signal = signal + p["noise"] * ctx.rng.standard_normal(signal.shape) * np.abs(signal).max()
    peak = np.abs(signal).max(axis=-1, keepdims=True)
    return (0.9 * signal / np.maximum(peak, 1e-9)).astype(np.float32)


def _image(ctx: RecipeContext, t: InputSpec, p: _Params) -> np.ndarray:
    """Smooth random gratings plus a little noise, each image scaled to [-1, 1]."""
    batch, channels, height, width = p.dim("batch"), p.dim("channels"), p.dim("height"), p.dim("width")
    y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    freq = ctx.rng.uniform(0.5, 4.0, size=(batch, channels, 3, 2, 1, 1))
    phase = ctx.rng.uniform(0, 2 * math.pi, size=(batch, channels, 3, 1, 1))
    waves = np.sin(2 * math.pi * (freq[:, :, :, 0] * y + freq[:, :, :, 1] * x) + phase).sum(axis=2)
    images = waves + 0.1 * ctx.rng.standard_normal(waves.shape)
    low = images.min(axis=(-2, -1), keepdims=True)
    high = images.max(axis=(-2, -1), keepdims=True)
    return (2 * (images - low) / np.maximum(high - low, 1e-9) - 1).astype(np.float32)


def _timesteps(ctx: RecipeContext, t: InputSpec, p: _Params) -> np.ndarray:
    batch = p.dim("batch")
    if p["dtype"] == "int64":
        return ctx.rng.integers(int(p["low"]), int(p["high"]), size=(batch,), dtype=np.int64)
    return ctx.rng.uniform(p["low"], p["high"], size=(batch,)).astype(np.float32)


def _builder(ctx: RecipeContext, t: InputSpec, p: _Params) -> Any:
    from align.builders.models import import_object

    fn = import_object(p["builder"], ctx.spec.source, f"models.{ctx.spec.name}.inputs.{t.name}.builder")
    made = fn(ctx, **p["args"])
    if isinstance(made, dict) and not made:
        raise ctx.fail(t.name, f"{p['builder']} returned no input")
    return made


_MAKERS = {
    "tokens": _tokens,
    "mask": lambda ctx, t, p: _padding(ctx, t),
    "labels": _labels,
    "classes": lambda ctx, t, p: ctx.rng.integers(0, p.dim("classes"), size=p.shape(), dtype=np.int64),
    "integers": lambda ctx, t, p: ctx.rng.integers(p["low"], p.dim("high"), size=p.shape()).astype(p["dtype"]),
    "float": _float,
    "audio": _audio,
    "image": _image,
    "bool": lambda ctx, t, p: ctx.rng.random(p.shape()) < p["p"],
    "timesteps": _timesteps,
    "builder": _builder,
}
