"""HF's decorators on modeling classes and forwards, reduced to what changes results here."""

from __future__ import annotations

import functools
import inspect
from typing import Any, TypedDict, Unpack  # noqa: F401  (Unpack is re-exported for converted files)


class TransformersKwargs(TypedDict, total=False):
    num_items_in_batch: Any
    output_attentions: bool
    output_hidden_states: bool


class FlashAttentionKwargs(TypedDict, total=False):
    cu_seq_lens_q: Any
    cu_seq_lens_k: Any


def auto_docstring(obj=None, **kwargs):
    """Documentation only: `@auto_docstring` and `@auto_docstring(custom_intro=...)` leave obj as is."""
    return obj if obj is not None else (lambda o: o)


def use_kernel_forward_from_hub(name: str):
    """HF may swap in a hub kernel; here the layer's own forward always runs."""
    return lambda cls: cls


def use_kernelized_func(*funcs):
    return lambda cls: cls


def can_return_tuple(forward):
    """return_dict=False (keyword or config) gives the output's non-None fields as a tuple."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(getattr(self, "config", None), "return_dict", True)
        out = forward(self, *args, **kwargs)
        return out if return_dict or isinstance(out, tuple) else out.to_tuple()

    return wrapper


def merge_with_config_defaults(forward):
    """Keywords the forward declares and the caller left None take the config's value."""
    names = [n for n in ("use_cache", "output_attentions", "output_hidden_states")
             if n in inspect.signature(forward).parameters]

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        for n in names:
            if kwargs.get(n) is None:
                kwargs[n] = getattr(self.config, n, None)
        return forward(self, *args, **kwargs)

    return wrapper


class OutputRecorder:
    """What HF's output capture would record from a module class (a class attribute's values).
    Inert here: capture_outputs refuses to be asked for what it records."""

    def __init__(self, target_class, index: int = 0, layer_name: str | None = None, **kwargs):
        self.target_class, self.index, self.layer_name = target_class, index, layer_name


def filter_output_hidden_states(forward):
    """A backbone's forward: the runtime has no backbones (see modeling.BackboneMixin)."""
    return forward


def capture_outputs(forward=None, **options):
    """HF collects hidden states and attentions with hooks when asked. align records every
    module itself, so asking the model for them is refused rather than silently ignored.
    Used bare (`@capture_outputs`) or with options (`@capture_outputs(tie_last_hidden_states=False)`)."""
    if forward is None:
        return lambda f: capture_outputs(f)
    return _refusing_capture(forward)


def _refusing_capture(forward):

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        for n in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(n, None):
                raise NotImplementedError(f"{n}=True is not supported by align's runtime")
        return forward(self, *args, **kwargs)

    return wrapper
