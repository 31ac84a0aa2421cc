"""Reading checkpoints: safetensors only, a single file or a sharded directory.

Pickle-based formats are refused: loading them can run arbitrary code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from align.spec import ConfigError

INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pdparams", ".pkl", ".ckpt")


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the file itself, or the shards its index lists."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise ConfigError(path, "", "pickle-based checkpoints are refused (they can run code); convert to safetensors")
    if path.is_dir():
        index = path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConfigError(index, "weight_map", f"not a valid safetensors index: {e}") from None
            return [path / name for name in sorted(set(weight_map.values()))]
        single = path / "model.safetensors"
        if single.is_file():
            return [single]
        raise ConfigError(path, "", f"no {INDEX} and no model.safetensors in this directory")
    if not path.is_file():
        raise ConfigError(path, "", "no such checkpoint")
    return [path]


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors checkpoint as numpy (bf16 is widened to fp32 exactly)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in shard_files(path):
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise ConfigError(f, "", f"not a readable safetensors file: {e}") from None
    return out
