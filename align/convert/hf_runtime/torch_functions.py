"""torch functions that source code looks up by name (`getattr(torch, window)(n)`), which
PaConvert cannot convert: their Paddle equivalents with torch's defaults."""

from __future__ import annotations

import paddle


def _window(name: str, *args):
    """torch's window functions with torch's defaults: periodic, float32 (kaiser: beta 12)."""

    def make(window_length: int, periodic: bool = True, *, dtype=None, **kwargs):
        spec = ("kaiser", float(kwargs.get("beta", 12.0))) if name == "kaiser" else name
        window = paddle.audio.functional.get_window(spec, window_length, fftbins=periodic, dtype="float64")
        return window.astype(dtype or "float32")

    return make


TORCH_FUNCTIONS = {f"{name}_window": _window(name) for name in ("hann", "hamming", "blackman", "bartlett", "kaiser")}


def torch_function(name: str):
    """The Paddle stand-in for `getattr(torch, name)`."""
    if name not in TORCH_FUNCTIONS:
        raise NotImplementedError(f"torch.{name}, looked up by name, has no stand-in in align's runtime "
                                  f"(known: {', '.join(sorted(TORCH_FUNCTIONS))})")
    return TORCH_FUNCTIONS[name]


def torch_int(x) -> int:
    """transformers.utils.torch_int: an int (a traced tensor under torch.jit, which never runs here)."""
    return int(x)
