"""Checkpoints: reading them safely, converting them shard by shard, verifying conversions.

safetensors is the format: a single file, or a directory of shards with
model.safetensors.index.json. Pickle-based formats (.bin, .pt, .pth, .pdparams) can run code
when loaded, so they are refused unless the caller allows them, and even then torch pickles
are loaded with weights_only=True and Paddle's by a restricted unpickler (weights.pickles).

Conversion streams: each output tensor is produced from memory-mapped inputs, written, and
dropped, and the input pages are released after use, so memory stays near one tensor (plus
the page cache the OS manages) whatever the checkpoint size. Output is written under a
temporary name beside the destination and renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from align.atomic import naming, temp_beside
from align.errors import ConfigError
from align.weights import pickles
from align.weights.plan import (
    WeightEntry,
    WeightMap,
    build_sources,
    build_targets,
    same_bytes,
)
from align.weights.safetensors_io import (
    NUMPY_VIEW,
    Planned,
    SafetensorsError,
    SafetensorsFile,
    bf16_from_f32,
    read_header,
    write_streaming,
)

INDEX = "model.safetensors.index.json"
PADDLE_SUFFIXES = (".pdparams", ".pdopt")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt", *PADDLE_SUFFIXES)
# numpy dtype -> safetensors name, for tensors that come out of a (trusted) pickle.
SAFETENSORS_DTYPE = {np.dtype(n): k for k, n in (
    ("F64", "<f8"), ("F32", "<f4"), ("F16", "<f2"), ("I64", "<i8"), ("I32", "<i4"), ("I16", "<i2"),
    ("I8", "i1"), ("U64", "<u8"), ("U32", "<u4"), ("U16", "<u2"), ("U8", "u1"), ("BOOL", "?"))}


def shard_files(path: Path, allow_pickle: bool = False) -> list[Path]:
    """The files of a checkpoint: the file itself, or the shards its index lists."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ConfigError(path, "", "pickle-based checkpoints are refused (a pickle can carry code); "
                                    "convert to safetensors, or pass --allow-pickle to read its tensors (never its code)")
    if path.is_dir():
        index = path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConfigError(index, "weight_map", f"not a valid safetensors index: {e}") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ConfigError(index, "weight_map", "not a mapping of tensor names to shard file names")
            for name in set(weight_map.values()):
                if Path(name).name != name:
                    raise ConfigError(index, "weight_map", f"names the shard {name!r}, outside the checkpoint's "
                                                           "directory: a shard is a file name beside the index")
            files = [path / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ConfigError(index, "weight_map", f"names shard(s) that do not exist: {', '.join(missing)}")
            return files
        single = path / "model.safetensors"
        if single.is_file():
            return [single]
        raise ConfigError(path, "", f"no {INDEX} and no model.safetensors in this directory")
    if not path.is_file():
        raise ConfigError(path, "", "no such checkpoint")
    return [path]


def _load_pickle(path: Path) -> dict[str, tuple[np.ndarray, str]]:
    """A pickle checkpoint as (raw array, safetensors dtype) per tensor, read as data only
    (weights.pickles): Paddle's by align's restricted unpickler, torch's by weights_only."""
    if path.suffix in PADDLE_SUFFIXES and not pickles.is_zip(path):
        return {k: (v, _dtype_name(path, k, v.dtype)) for k, v in pickles.load_paddle(path).items()}
    import torch

    out = {}
    for k, t in pickles.load_torch(path).items():
        if t.dtype == torch.bfloat16:
            out[k] = (t.contiguous().view(torch.int16).numpy().view(np.uint16), "BF16")
        else:
            arr = t.contiguous().numpy()
            out[k] = (arr, _dtype_name(path, k, arr.dtype))
    return out


def _dtype_name(path: Path, key: str, dtype: np.dtype) -> str:
    if dtype not in SAFETENSORS_DTYPE:
        raise ConfigError(path, key, f"a tensor of {dtype}, which safetensors cannot hold")
    return SAFETENSORS_DTYPE[dtype]


class Checkpoint:
    """A checkpoint's tensors by name: shapes and dtypes up front, data mapped on demand."""

    def __init__(self, path: Path, allow_pickle: bool = False):
        self.path = Path(path)
        self.files = shard_files(self.path, allow_pickle)
        self._open: dict[Path, SafetensorsFile] = {}
        self._pickled: dict[str, tuple[np.ndarray, str]] = {}
        self.where: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
        try:
            for f in self.files:
                if f.suffix in PICKLE_SUFFIXES:
                    self._pickled = _load_pickle(f)
                    self.where.update({k: (f, d, tuple(a.shape)) for k, (a, d) in self._pickled.items()})
                    continue
                infos, _ = read_header(f)
                for k, info in infos.items():
                    if k in self.where:
                        raise ConfigError(f, "", f"tensor {k!r} is also in {self.where[k][0].name}")
                    self.where[k] = (f, info.dtype, info.shape)
        except SafetensorsError as e:
            raise ConfigError(e.path, "", e.message) from None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: s for k, (_, _, s) in self.where.items()}

    def dtype(self, key: str) -> str:
        return self.where[key][1]

    def shard(self, key: str) -> Path:
        return self.where[key][0]

    def get(self, key: str) -> np.ndarray:
        if key in self._pickled:
            return self._pickled[key][0]
        f = self.where[key][0]
        if f not in self._open:
            self._open[f] = SafetensorsFile(f)
        return self._open[f].read(key)

    def release(self, key: str) -> None:
        f = self.where[key][0]
        if f in self._open:
            self._open[f].release(key)

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_safetensors(path: Path, skip: Callable[[str], bool] = lambda k: False) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors checkpoint as numpy copies (bf16 widened to fp32 exactly)."""
    from align.weights.safetensors_io import f32_from_bf16

    out = {}
    with Checkpoint(path) as ckpt:
        for k in ckpt.where:
            if skip(k):
                continue
            arr = ckpt.get(k)
            out[k] = f32_from_bf16(arr) if ckpt.dtype(k) == "BF16" else np.array(arr)
            del arr
    return out


@dataclass(frozen=True)
class Outputs:
    """What a conversion writes for one entry, in which dtype, and what it reads."""

    entry: WeightEntry
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    reads: tuple[str, ...]


def outputs_of(wmap: WeightMap, to: str) -> list[Outputs]:
    """Per written entry: the tensors a conversion toward `to` ("paddle" or "torch") produces."""
    outs = []
    for e in wmap.written():
        flip = (lambda s: tuple(s[::-1])) if e.transposed else tuple
        if to == "paddle" and (e.permute or e.reshape):
            outs.append(Outputs(e, e.targets, (tuple(e.target_shape),), e.sources))
        elif to == "paddle":
            shapes = (tuple(e.part_shapes) if e.transform == "split" else (tuple(e.source_shape),))
            outs.append(Outputs(e, e.targets, tuple(flip(s) for s in shapes), e.sources))
        else:
            shapes = tuple(e.part_shapes) if e.transform == "merge" else (tuple(e.source_shape),)
            outs.append(Outputs(e, e.sources, tuple(tuple(s) for s in shapes), e.targets))
    return outs


def _produce(o: Outputs, to: str, get: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    return build_targets(o.entry, get) if to == "paddle" else build_sources(o.entry, get)


def _producer(o: Outputs, name: str, to: str, src: Checkpoint, cache: dict, dtype: str) -> Callable[[], np.ndarray]:
    """Make one output tensor on demand. The outputs of a split are built together and kept
    until each is written; then the inputs' pages are released."""

    def produce() -> np.ndarray:
        if id(o) not in cache:
            cache[id(o)] = _produce(o, to, src.get)
        arr = cache[id(o)].pop(name)
        if not cache[id(o)]:
            del cache[id(o)]
            for k in o.reads:
                src.release(k)
        if dtype == "BF16" and src.dtype(o.reads[0]) == "F32":
            arr = bf16_from_f32(np.ascontiguousarray(arr))
        return arr

    return produce


@dataclass
class ConvertResult:
    destination: Path
    tensors: int
    bytes: int
    seconds: float
    shards: list[str] = field(default_factory=list)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


def convert_checkpoint(src: Checkpoint, dst: Path, wmap: WeightMap, to: str, *,
                       cast: str | None = None, keep_fp32: Callable[[str], bool] = lambda k: False,
                       force: bool = False, on_progress: Callable[[int, int], None] | None = None) -> ConvertResult:
    """Write the image of `src` under `wmap` to `dst` (a .safetensors file or a directory of shards).

    Each output shard gathers the tensors whose first input lives in the matching input
    shard, so a sharded checkpoint converts shard by shard.
    """
    dst = Path(dst)
    if dst.exists() and not force:
        raise ConfigError(dst, "", "already exists (pass --force to replace it)")
    single = dst.suffix == ".safetensors"
    outputs = outputs_of(wmap, to)
    missing = sorted({k for o in outputs for k in o.reads if k not in src.where})
    if missing:
        raise ConfigError(src.path, "", f"has no tensor {missing[0]!r}, which the rules read "
                                        f"({len(missing)} missing in all)")
    by_shard: dict[Path, list[Outputs]] = {}
    for o in outputs:
        by_shard.setdefault(src.shard(o.reads[0]), []).append(o)

    def out_dtype(o: Outputs, name: str) -> str:
        dtypes = {src.dtype(k) for k in o.reads}
        if len(dtypes) != 1:
            raise ConfigError(src.path, "", f"{name}: its parts {list(o.reads)} have different dtypes {sorted(dtypes)}")
        dtype = dtypes.pop()
        if cast == "BF16" and dtype == "F32" and not keep_fp32(name):
            return "BF16"
        return dtype

    total = sum(int(np.prod(s, dtype=np.int64)) * NUMPY_VIEW[out_dtype(o, n)].itemsize
                for o in outputs for n, s in zip(o.names, o.shapes))
    done = [0]
    started = time.perf_counter()
    tmp = temp_beside(dst, directory=True)
    shard_names, weight_map, count = [], {}, 0
    try:
        groups = [(None, outputs)] if single else list(by_shard.items())
        for i, (_, group) in enumerate(groups):
            name = dst.name if single else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            cache: dict[int, dict[str, np.ndarray]] = {}
            # Sorted by name within a shard: the same tensors always make the same file, so a
            # paddle -> torch -> paddle round trip reproduces the file byte for byte.
            items = sorted(((o, n, s) for o in group for n, s in zip(o.names, o.shapes)), key=lambda x: x[1])
            planned = [Planned(n, d, tuple(s), _producer(o, n, to, src, cache, d))
                       for o, n, s in items for d in (out_dtype(o, n),)]
            weight_map.update({n: name for _, n, _ in items})
            count += len(items)

            def tick(t: Planned, nbytes: int) -> None:
                done[0] += nbytes
                if on_progress:
                    on_progress(done[0], total)

            write_streaming(tmp / name, planned, {"format": "pt" if to == "torch" else "paddle"}, tick)
            shard_names.append(name)
        if single:
            final = tmp / dst.name
        else:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
            final = tmp
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        os.replace(final, dst)
    except OSError as e:
        raise naming(e, dst) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ConvertResult(dst, count, total, time.perf_counter() - started, shard_names)


@dataclass
class VerifyResult:
    checked: int = 0
    matched: int = 0
    mismatched: list[str] = field(default_factory=list)  # "name: why"
    missing: list[str] = field(default_factory=list)  # expected in DST, absent
    extra: list[str] = field(default_factory=list)  # in DST, never written by the rules
    unmapped: list[str] = field(default_factory=list)  # source keys that map to nothing
    unwritten: list[str] = field(default_factory=list)  # target keys no rule writes

    @property
    def ok(self) -> bool:
        return (self.checked > 0 and self.matched == self.checked
                and not (self.mismatched or self.missing or self.extra or self.unmapped or self.unwritten))


def verify_checkpoint(src: Checkpoint, dst: Checkpoint, wmap: WeightMap, to: str,
                      ignored: Callable[[str], bool] = lambda k: False) -> VerifyResult:
    """Prove, tensor by tensor, that `dst` is the exact image of `src` under `wmap`."""
    result = VerifyResult(unmapped=list(wmap.unmapped), unwritten=list(wmap.unwritten))
    expected_names = set()
    for o in outputs_of(wmap, to):
        expected_names.update(o.names)
        if any(k not in src.where for k in o.reads):
            result.missing.extend(f"{n} (its source {', '.join(o.reads)} is not in SRC)" for n in o.names)
            continue
        built = _produce(o, to, src.get)
        for n in o.names:
            if n not in dst.where:
                result.missing.append(n)
                continue
            result.checked += 1
            got = dst.get(n)
            want = built[n]
            if dst.dtype(n) == "BF16" and src.dtype(o.reads[0]) == "F32":
                want = bf16_from_f32(np.ascontiguousarray(want))
            if same_bytes(got, np.ascontiguousarray(want)):
                result.matched += 1
            else:
                why = (f"shape {list(got.shape)} vs {list(want.shape)}" if got.shape != want.shape else
                       f"dtype {dst.dtype(n)} vs {src.dtype(o.reads[0])}" if got.dtype != want.dtype else
                       f"{int(np.count_nonzero(got != want))} element(s) differ")
                result.mismatched.append(f"{n}: {why}")
            dst.release(n)
        for k in o.reads:
            src.release(k)
    result.extra = sorted(k for k in dst.where if k not in expected_names and not ignored(k))
    return result
