"""The reference (torch) and the port (paddle) from a ModelSpec: with seeded random weights or a
checkpoint's, or as skeletons whose parameters take no memory (for streaming and shapes)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from align.errors import ConfigError, one_line
from align.registry.spec import ModelSpec, read_json, resolve_path


def import_object(target: str, file: Path, key: str) -> Any:
    """'package.module:Attr' -> the object; a ConfigError names the align.toml key."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(file, key, f"cannot import {module_name!r}: {e}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(file, key, f"{module_name!r} has no {attr!r}") from None


def config_values(spec: ModelSpec, config: str) -> tuple[dict[str, Any], Path, str]:
    """The config's values, the file they came from, and the key prefix inside that file.

    `config` names a table under [models.NAME.configs] or is the path of a JSON file: for a
    class with a config class, a whole config.json (transformers'); for a class or builder
    called with the values, a JSON object whose keys override the default config's.
    """
    if config in spec.configs and isinstance(spec.configs[config], dict):
        return dict(spec.configs[config]), spec.source, f"models.{spec.name}.configs.{config}."
    path = resolve_path(spec.configs[config], spec.source) if config in spec.configs else Path(config)
    if path.suffix != ".json":
        known = ", ".join(sorted(spec.configs))
        raise ConfigError(spec.source, f"models.{spec.name}.configs.{config}",
                          f"unknown config (known: {known}; or pass a config.json path)")
    values = read_json(path, "no such config file")
    if not isinstance(values, dict):
        raise ConfigError(path, "", f"expected a JSON object of config values, got {type(values).__name__}")
    if spec.reference_config_class is None and isinstance(spec.configs.get(spec.default_config), dict):
        return {**spec.configs[spec.default_config], **values}, path, ""
    return values, path, ""


# Bookkeeping keys a saved config.json carries that are not model fields.
_CONFIG_JSON_EXTRAS = ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype")


def reference_config(spec: ModelSpec, config: str) -> Any:
    """The reference's config: a transformers config object for a class with a config class,
    else the values themselves (a dict, what the class or builder is called with).

    In an align.toml table, keys the config class does not define are refused: transformers
    would keep a typo silently as an attribute that nothing reads. A checkpoint's own
    config.json is taken as transformers takes it, legacy keys included.
    """
    values, file, prefix = config_values(spec, config)
    if spec.reference_config_class is None:
        return values
    cls = import_object(spec.reference_config_class, spec.source, f"models.{spec.name}.reference.config_class")
    defaults = cls()
    for key in values if file == spec.source else ():
        if not hasattr(defaults, key) and key not in _CONFIG_JSON_EXTRAS:
            raise ConfigError(file, prefix + key, f"{cls.__name__} has no such field")
    kwargs = {k: v for k, v in values.items() if k not in _CONFIG_JSON_EXTRAS}
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    try:
        return cls(**kwargs)
    except Exception as e:  # noqa: BLE001 - the config class refused the user's values: name them
        raise ConfigError(file, prefix.rstrip(".") or "", f"{cls.__name__} refused these values: "
                                                          f"{type(e).__name__}: {one_line(e)}") from None


def values_of(cfg: Any) -> dict[str, Any]:
    """A config's values as a plain dict (what the port is built from, what a trace keeps)."""
    return dict(cfg) if isinstance(cfg, dict) else cfg.to_dict()


def _construct(spec: ModelSpec, side: str, cfg: Any, module_type: Any) -> Any:
    """The reference's or the port's module from its config: cls(config) for a class with a
    config class (the port's built with config_class.from_dict(values)), else the class or
    builder called with the config's values as keywords. What it raises, or a result that
    is not a module of its framework, is the user's to fix: a ConfigError naming the key."""
    target = spec.reference_class if side == "reference" else spec.port_class
    config_class = spec.reference_config_class if side == "reference" else spec.port_config_class
    key = f"models.{spec.name}.{side}.{'class' if config_class else 'class (or builder)'}"
    obj = import_object(target, spec.source, key)
    try:
        model = _call(obj, side, config_class, cfg, spec)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's code: say where it broke, in one line
        raise ConfigError(spec.source, key, f"{target} raised {type(e).__name__}: {one_line(e)}") from None
    if not isinstance(model, module_type):
        raise ConfigError(spec.source, key, f"{target} returned a {type(model).__name__}, not a "
                                            f"{module_type.__module__}.{module_type.__qualname__}")
    return model


def _call(obj: Any, side: str, config_class: str | None, cfg: Any, spec: ModelSpec) -> Any:
    if config_class is None:
        return obj(**values_of(cfg))
    if side == "port":
        cfg_cls = import_object(config_class, spec.source, f"models.{spec.name}.port.config_class")
        return obj(cfg_cls.from_dict(values_of(cfg)))
    return obj(cfg)


def build_reference(spec: ModelSpec, cfg: Any, checkpoint: Path | None = None,
                    ignore: Callable[[str], Any] = lambda k: None) -> Any:
    """The torch reference in eval mode, with seeded random weights or a checkpoint's
    (whose tensors the weight rules ignore are skipped)."""
    import torch

    torch.manual_seed(spec.init.seed)
    model = _construct(spec, "reference", cfg, torch.nn.Module).eval()
    if checkpoint is not None:
        from align.weights.checkpoint import load_safetensors

        state = {k: torch.from_numpy(v) for k, v in load_safetensors(checkpoint, skip=ignore).items()}
        own = model.state_dict()
        for k, t in state.items():
            if k in own and tuple(t.shape) != tuple(own[k].shape):
                raise ConfigError(checkpoint, k, f"shape {list(t.shape)} in the checkpoint, but "
                                                 f"{type(model).__name__} of this config has {list(own[k].shape)}")
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or {})
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise ConfigError(checkpoint, "", f"does not fit {type(model).__name__}: missing {sorted(missing)[:5]}, "
                                              f"unexpected {sorted(unexpected)[:5]}")
        return model
    # The model's own initialisation plus N(0, std) noise on every parameter, in name order.
    # Norm weights stay around their own scale (1 for LayerNorm, 0 for Gemma's 1 + w) but
    # differ per channel, biases stop being zero: every weight matters to the output, and the
    # same seed gives the same weights on every machine.
    if spec.init.std:
        gen = torch.Generator().manual_seed(spec.init.seed)
        with torch.no_grad():
            for _, p in sorted(model.named_parameters()):
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * spec.init.std)
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise ConfigError(spec.source, f"models.{spec.name}.reference", f"parameter {name} is not finite after "
                              f"{spec.reference_class}'s own initialisation (a torch.empty no init fills?): "
                              f"initialise it in a reference builder, or give a --checkpoint")
    return model


def build_port(spec: ModelSpec, cfg: Any) -> Any:
    """The Paddle port in eval mode, built from the same config values as the reference."""
    return build_port_from(spec, values_of(cfg))


def build_port_from(spec: ModelSpec, values: dict[str, Any]) -> Any:
    """The Paddle port in eval mode, from the reference config's values (no transformers needed)."""
    from align.capture.paddle_side import paddle

    paddle.seed(spec.init.seed)
    model = _construct(spec, "port", values, paddle.nn.Layer)
    model.eval()
    return model


def load_port_pretrained(spec: ModelSpec, values: dict[str, Any], weights: dict[str, np.ndarray]) -> Any:
    """The port loaded by its OWN checkpoint loader (`from_pretrained(dir, convert_from_hf=True)`,
    as PaddleFormers has), from an HF-format directory holding the reference's weights."""
    import json

    from safetensors.numpy import save_file

    from align.atomic import scratch

    cls = import_object(spec.port_class, spec.source, f"models.{spec.name}.port.class")
    if spec.port_config_class is None or not hasattr(cls, "from_pretrained"):
        raise ConfigError(spec.source, f"models.{spec.name}.port.class",
                          f"{spec.port_class} has no from_pretrained loader (--weights-from pretrained)")
    cfg_cls = import_object(spec.port_config_class, spec.source, f"models.{spec.name}.port.config_class")
    with scratch("hf") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(values, default=str))
        save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(Path(tmp) / "model.safetensors"),
                  metadata={"format": "pt"})
        model = cls.from_pretrained(tmp, config=cfg_cls.from_dict(values), convert_from_hf=True)
    model.eval()
    return model


def port_skeleton(spec: ModelSpec, values: dict[str, Any]) -> Any:
    """The port in eval mode with its parameters declared but not allocated (paddle.LazyGuard);
    `set_value` gives one its data, `_clear_data` takes it away again."""
    from align.capture.paddle_side import paddle

    with paddle.LazyGuard():
        model = _construct(spec, "port", values, paddle.nn.Layer)
    model.eval()
    return model


def port_slots(spec: ModelSpec, cfg: Any) -> dict:
    """The port's tensors (shapes, owning layer types, ties) without allocating its weights."""
    from align.weights.plan import describe_slots

    model = port_skeleton(spec, values_of(cfg))
    return describe_slots(model.state_dict(), dict(model.named_sublayers(include_self=True)))


def reference_shapes(spec: ModelSpec, cfg: Any) -> dict[str, tuple[int, ...]]:
    """The reference's state-dict shapes, built on torch's meta device (no memory)."""
    import torch

    with torch.device("meta"):
        model = _construct(spec, "reference", cfg, torch.nn.Module)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def reference_skeleton(spec: ModelSpec, cfg: Any) -> Any:
    """The reference in eval mode with its parameters on torch's meta device (no memory) and
    its buffers real: each module holding a buffer is re-initialised by the model's own
    `_init_weights` (transformers computes RoPE tables there)."""
    import torch

    with torch.device("meta"):
        model = _construct(spec, "reference", cfg, torch.nn.Module)
    for module in model.modules():
        metas = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if metas:
            if not hasattr(model, "_init_weights"):
                raise ConfigError(spec.source, f"models.{spec.name}.stream", f"{type(model).__name__} has buffers but "
                                  "no _init_weights to compute them on a skeleton: it cannot be streamed")
            for n in metas:
                module._buffers[n] = torch.empty_like(module._buffers[n], device="cpu")
            model._init_weights(module)
    return model.eval()
