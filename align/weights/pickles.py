"""Pickle checkpoints read as data, never as code.

A pickle names the callables that rebuild its objects, and unpickling calls them: that is how
a checkpoint runs `os.system`. Consent to read a pickle checkpoint (--allow-pickle) is consent
to read tensors, so neither format is unpickled freely:
- Paddle's (.pdparams, .pdopt: a pickle of dicts, lists, tuples and numpy arrays) goes through
  `SafeUnpickler`, which resolves only the few names numpy arrays and those containers need;
- torch's (zip or raw) goes through torch's own weights_only loader.
Any other name the file asks for is refused, with the file and the name, before anything runs.
"""

from __future__ import annotations

import _compat_pickle
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from align.errors import ConfigError

# What a Paddle checkpoint needs to be rebuilt: its containers, numpy arrays, dtypes and
# scalars, and (protocol 2) bytes, which Python 3 pickles as _codecs.encode(str, "latin1").
SAFE_NAMES = frozenset({
    ("builtins", "tuple"), ("builtins", "list"), ("builtins", "dict"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "bytearray"), ("collections", "OrderedDict"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
    ("_codecs", "encode"),
})
ZIP_MAGIC = b"PK\x03\x04"
# Paddle's bookkeeping entries in a saved state dict, beside the tensors.
_PADDLE_NAMES = "StructuredToParameterName@@"
_PADDLE_BIG = "UnpackBigParamInfor@@"


class Refused(pickle.UnpicklingError):
    """The pickle asked for a name outside SAFE_NAMES."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


class SafeUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only SAFE_NAMES, and no persistent ids."""

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (protocol 2), as pickle itself maps them: __builtin__ is builtins
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in SAFE_NAMES:
            return super().find_class(module, name)
        raise Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise Refused(f"a persistent object ({str(pid)[:60]})")


def refused(path: Path, what: str) -> ConfigError:
    return ConfigError(path, "", f"refused: the pickle asks for the object {what}; only tensors and plain data are "
                                 "loaded, never code")


def load_paddle(path: Path) -> dict[str, np.ndarray]:
    """A Paddle pickle's tensors by name (nested dicts, as in a .pdopt, joined with dots;
    numbers and strings beside them left out), read by SafeUnpickler."""
    try:
        with open(path, "rb") as f:
            state = SafeUnpickler(f).load()
    except Refused as e:
        raise refused(path, e.what) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError) as e:
        raise ConfigError(path, "", f"not a readable Paddle pickle: {type(e).__name__}: {e}"[:300]) from None
    if not isinstance(state, dict):
        raise ConfigError(path, "", f"holds a {type(state).__name__}, not a dict of tensors")
    out: dict[str, np.ndarray] = {}
    _flatten(path, _joined(state), "", out)
    return out


def _joined(state: dict) -> dict:
    """Paddle splits a tensor too large for pickle protocol 2 into slices, listed under
    UnpackBigParamInfor@@: join them back."""
    big = state.get(_PADDLE_BIG)
    if not isinstance(big, dict):
        return state
    state = dict(state)
    for key, info in big.items():
        slices = [_array_of(state.pop(s)) for s in info.get("slices", ()) if s in state]
        if slices and all(isinstance(s, np.ndarray) for s in slices):
            state[key] = np.concatenate([s.ravel() for s in slices]).reshape(info["OriginShape"])
    return state


def _array_of(value: Any) -> Any:
    """A saved Paddle tensor is (its name, its array), or the array alone."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], np.ndarray):
        return value[1]
    return value


def _flatten(path: Path, state: dict, prefix: str, out: dict[str, np.ndarray]) -> None:
    for key, value in state.items():
        if key in (_PADDLE_NAMES, _PADDLE_BIG):
            continue
        if not isinstance(key, str):
            raise ConfigError(path, str(key), f"a key of type {type(key).__name__}, not a tensor name")
        name = prefix + key
        value = _array_of(value)
        if isinstance(value, dict):
            _flatten(path, value, name + ".", out)
        elif isinstance(value, np.ndarray):
            if value.dtype.kind not in "biufc":
                raise ConfigError(path, name, f"an array of {value.dtype}, not numbers")
            out[name] = np.ascontiguousarray(value)


def load_torch(path: Path) -> dict[str, Any]:
    """A torch pickle (zip or raw) by torch's weights_only loader: tensors and plain data."""
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:Unsupported global|Unsupported operand): (?:GLOBAL )?(\S+)", str(e))
        raise refused(path, found.group(1) if found else "that is no tensor or plain data") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise ConfigError(path, "", f"not a readable torch checkpoint: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(state, dict):
        raise ConfigError(path, "", f"holds a {type(state).__name__}, not a dict of tensors")
    tensors = {k: t for k, t in state.items() if isinstance(t, torch.Tensor)}
    if not tensors:
        raise ConfigError(path, "", "holds no tensor")
    return tensors


def is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == ZIP_MAGIC
