"""Input recipes: [models.NAME.inputs] and one [models.NAME.inputs.INPUT] table per input.

    [models.vit.inputs]
    seed = 1
    backward = "loss"                 # or "projection" (the default), or "output:logits"

    [models.vit.inputs.pixel_values]
    kind = "image"
    batch = 2
    channels = "num_channels"        # a string is a key of the model's config
    height = "image_size"
    width = "image_size"
    requires_grad = true              # its gradient is judged, as input:pixel_values

Every kind's parameters are declared in KINDS below, read with their types, and checked
here; the values are made in builders/inputs.py, in table order, from one generator.
"""

from __future__ import annotations

from typing import Any

from align.errors import ConfigError
from align.registry.spec import InputSpec, InputsRecipe

BACKWARD_SEEDS = ("loss", "projection")  # or "output:PATH"

# A dimension: an integer, or the name of an integer in the model's config.
DIM = (int, str)
SHAPE = list
REQUIRED = ...

# kind -> {parameter: (type(s), default)}; REQUIRED has no default. Parameters common to all
# kinds: kind, requires_grad (floating kinds only) and position.
KINDS: dict[str, dict[str, tuple[Any, Any]]] = {
    # token ids in [0, vocab), each sample left-padded by its entry of left_pad with pad_id
    # (default: the config's pad_token_id, else 0)
    "tokens": {"batch": (DIM, REQUIRED), "seq_len": (DIM, REQUIRED), "vocab": (DIM, "vocab_size"),
               "left_pad": (list, []), "pad_id": (DIM, None)},
    # 1 for real tokens, 0 for the padding of the tokens input `of`
    "mask": {"of": (str, REQUIRED)},
    # language-model labels of the tokens input `of`: causal_lm (each real token), masked_lm
    # (a `fraction` of the real tokens); every other position is -100, ignored
    "labels": {"of": (str, REQUIRED), "task": (str, REQUIRED), "fraction": (float, 0.3)},
    # class indices in [0, classes)
    "classes": {"shape": (SHAPE, REQUIRED), "classes": (DIM, "num_labels")},
    # integers in [low, high)
    "integers": {"shape": (SHAPE, REQUIRED), "low": (int, 0), "high": (DIM, REQUIRED), "dtype": (str, "int64")},
    # floats: normal(mean, std) or uniform(low, high)
    "float": {"shape": (SHAPE, REQUIRED), "distribution": (str, "normal"), "mean": (float, 0.0), "std": (float, 1.0),
              "low": (float, -1.0), "high": (float, 1.0), "dtype": (str, "float32")},
    # waveforms in [-1, 1], (batch, channels, samples): a few tones of random pitch and phase
    # plus noise; with `like`, a copy of that audio input with noise added (a prediction
    # close to its target, as a loss sees it)
    "audio": {"batch": (DIM, None), "channels": (DIM, 1), "samples": (DIM, None), "sample_rate": (DIM, 16000),
              "tones": (int, 4), "noise": (float, 0.05), "like": (str, None), "perturbation": (float, 0.1)},
    # images (batch, channels, height, width): smooth random patterns plus noise, scaled to [-1, 1]
    "image": {"batch": (DIM, REQUIRED), "channels": (DIM, 3), "height": (DIM, REQUIRED), "width": (DIM, REQUIRED)},
    # booleans, each True with probability p
    "bool": {"shape": (SHAPE, REQUIRED), "p": (float, 0.5)},
    # diffusion timesteps, one per sample, uniform in [low, high)
    "timesteps": {"batch": (DIM, REQUIRED), "low": (float, 0.0), "high": (float, 1000.0), "dtype": (str, "float32")},
    # anything else: builder(ctx, **args) in a reference/<family>.py returns one array (this
    # input) or a dict of arrays (several inputs, named by its keys)
    "builder": {"builder": (str, REQUIRED), "args": (dict, {})},
}
FLOATING = ("float", "audio", "image", "timesteps")
CHOICES = {("labels", "task"): ("causal_lm", "masked_lm"), ("float", "distribution"): ("normal", "uniform"),
           ("integers", "dtype"): ("int64", "int32"), ("float", "dtype"): ("float32", "float64"),
           ("timesteps", "dtype"): ("float32", "int64")}


def parse_inputs(t: Any) -> InputsRecipe:
    """[models.NAME.inputs] (a registry.load._Table) -> InputsRecipe; errors name the key."""
    seed = t.get("seed", int, 0)
    backward = t.get("backward", str, "projection")
    if backward not in BACKWARD_SEEDS and not (backward.startswith("output:") and backward[len("output:"):]):
        raise ConfigError(t.file, t.key("backward"), f"unknown value {backward!r} (known: loss, projection, "
                                                     f"output:PATH such as output:logits)")
    derived = t.get("derived", list, [])
    for d in derived:
        if not isinstance(d, str) or d.count(":") != 1 or not all(d.split(":")):
            raise ConfigError(t.file, t.key("derived"), f"expected 'module:function' (e.g. "
                                                        f"'reference.text:mean_pooled'), got {d!r}")
    constants = t.get("constants", dict, {})
    for name, value in constants.items():
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(t.file, f"{t.key('constants')}.{name}", f"expected a plain value (a boolean, number or "
                                                                     f"string), got {value!r}")
    tensors = []
    for name, value in t.data.items():
        if name in t.read:
            continue
        if not isinstance(value, dict):
            raise ConfigError(t.file, t.key(name), f"unknown key: an input is a table ([{t.key(name)}]) with a kind")
        tensors.append(_input(t.table(name), name))
    t.done()
    names = {x.name for x in tensors}
    for x in tensors:
        of = x.params.get("of") or x.params.get("like")
        if of is not None and (of not in names or [y.name for y in tensors].index(of) > [y.name for y in tensors].index(x.name)):
            raise ConfigError(t.file, f"{t.key(x.name)}.{'of' if 'of' in x.params else 'like'}",
                              f"names no input declared before it: {of!r}")
    positions = [x.position for x in tensors if x.position is not None]
    if sorted(positions) != list(range(len(positions))):
        raise ConfigError(t.file, t.path, f"input positions must be 0, 1, ... without gaps, got {sorted(positions)}")
    clash = sorted(names & set(constants))
    if clash:
        raise ConfigError(t.file, f"{t.key('constants')}.{clash[0]}", "is also an input table: name it once")
    return InputsRecipe(seed=seed, tensors=tuple(tensors), backward=backward, derived=tuple(derived),
                        constants=tuple(constants.items()))


def _input(t: Any, name: str) -> InputSpec:
    kind = t.get("kind", str)
    if kind not in KINDS:
        raise ConfigError(t.file, t.key("kind"), f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
    params = {}
    for param, (types, default) in KINDS[kind].items():
        value = t.get(param, types, default)
        if value is not None and (kind, param) in CHOICES and value not in CHOICES[kind, param]:
            raise ConfigError(t.file, t.key(param), f"unknown value {value!r} (known: {', '.join(CHOICES[kind, param])})")
        if types is SHAPE and not all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in value):
            raise ConfigError(t.file, t.key(param), f"expected a list of integers or config keys, got {value!r}")
        for d in (value if types is SHAPE else [value] if types is DIM else []):
            if isinstance(d, str) and not all(part.isidentifier() for part in d.split(".")):
                raise ConfigError(t.file, t.key(param), f"expected an integer, or a config key naming one (dotted for a nested config: "
                                                         f"vision_config.image_size), got {d!r}")
            if isinstance(d, int) and d < 0:
                raise ConfigError(t.file, t.key(param), f"must be >= 0, got {d}")
        params[param] = value
    if kind == "tokens":
        pads, batch, seq_len = params["left_pad"], params["batch"], params["seq_len"]
        if not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in pads) or (
                pads and isinstance(batch, int) and isinstance(seq_len, int)
                and (len(pads) != batch or not all(p < seq_len for p in pads))):
            raise ConfigError(t.file, t.key("left_pad"), f"expected {batch} integers in [0, {seq_len}) (one per "
                                                         f"sample), got {pads!r}")
    if kind == "audio" and params["like"] is None:
        for need in ("batch", "samples"):
            if params[need] is None:
                raise ConfigError(t.file, t.key(need), "missing key (an audio input not `like` another needs it)")
    if kind == "builder" and (params["builder"].count(":") != 1 or not all(params["builder"].split(":"))):
        raise ConfigError(t.file, t.key("builder"), f"expected 'module:function', got {params['builder']!r}")
    grad = t.get("requires_grad", bool, False)
    if grad and kind not in FLOATING + ("builder",):
        raise ConfigError(t.file, t.key("requires_grad"), f"a {kind} input has no gradient (floating kinds: "
                                                          f"{', '.join(FLOATING)})")
    position = t.get("position", int, None)
    if position is not None and position < 0:
        raise ConfigError(t.file, t.key("position"), f"must be >= 0, got {position}")
    t.done()
    return InputSpec(name, kind, params, grad, position)
