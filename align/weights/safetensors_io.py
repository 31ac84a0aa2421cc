"""safetensors files read and written as bytes: memory-mapped, streamed, framework-free.

A file is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the data. Reading maps the file and checks every number in
the header against the file before any tensor is touched, so a truncated or corrupt file
is an error that names it, never a read out of bounds. bf16 (and fp8) tensors are handled
as raw 16-bit (8-bit) words: transposes, splits and concatenations move bytes exactly.
Writing streams one tensor at a time after the header, so a writer never holds a shard.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from align.errors import ConfigError, one_line

# safetensors dtype -> the numpy dtype its bytes are viewed as (bf16 and fp8 as raw words).
NUMPY_VIEW = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"), "F8_E4M3": np.dtype("u1"), "F8_E5M2": np.dtype("u1"),
}
MAX_HEADER = 100 << 20


class SafetensorsError(Exception):
    """A file that is not a valid safetensors file; the message names the file and the problem."""

    def __init__(self, path: Path, message: str):
        self.path, self.message = path, message
        super().__init__(f"{path}: {message}")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name: "F32", "BF16", ...
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    """One safetensors file, mapped read-only. Use as a context manager."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise SafetensorsError(self.path, f"cannot open: {e.strerror}") from None
        try:
            self.tensors, self.metadata = _parse_header(self.path, self._file)
            size = os.fstat(self._file.fileno()).st_size
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except BaseException:
            self._file.close()
            raise

    def read(self, name: str) -> np.ndarray:
        """A read-only numpy view of one tensor's bytes (no copy)."""
        info = self.tensors[name]
        dtype = NUMPY_VIEW[info.dtype]
        count = info.nbytes // dtype.itemsize
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=info.start).reshape(info.shape)

    def release(self, name: str) -> None:
        """Drop a tensor's pages from this process (they stay in the page cache)."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        info = self.tensors[name]
        page = mmap.PAGESIZE
        start = (info.start // page) * page
        if info.end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, info.end - start)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # numpy views of it are still alive; the mapping goes when they do
        self._file.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _parse_header(path: Path, f) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    size = os.fstat(f.fileno()).st_size
    raw = f.read(8)
    if len(raw) < 8:
        raise SafetensorsError(path, f"truncated: {size} bytes, not even the 8-byte header length")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER or 8 + n > size:
        raise SafetensorsError(path, f"corrupt or truncated: header of {n} bytes in a file of {size} bytes")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(path, f"corrupt header: {e}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(path, "corrupt header: not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (lo, hi) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(path, f"corrupt header entry for tensor {name!r}") from None
        if dtype not in NUMPY_VIEW:
            raise SafetensorsError(path, f"tensor {name!r} has unknown dtype {dtype!r}")
        expected = int(np.prod(shape, dtype=np.int64)) * NUMPY_VIEW[dtype].itemsize
        if not (0 <= lo <= hi) or hi - lo != expected:
            raise SafetensorsError(path, f"tensor {name!r}: byte range [{lo}, {hi}) does not fit "
                                   f"{dtype} {list(shape)} ({expected} bytes)")
        if base + hi > size:
            raise SafetensorsError(path, f"truncated: tensor {name!r} ends at byte {base + hi}, "
                                   f"the file has {size}")
        tensors[name] = TensorInfo(name, dtype, shape, base + lo, base + hi)
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise SafetensorsError(path, f"corrupt: tensors {a!r} and {b!r} overlap")
    return tensors, metadata


def read_header(path: Path | str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _parse_header(path, f)
    except OSError as e:
        raise SafetensorsError(path, f"cannot open: {e.strerror}") from None


@dataclass(frozen=True)
class Planned:
    """A tensor to be written: its name, dtype, shape, and how to produce its array."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]


def write_streaming(path: Path, tensors: Iterable[Planned], metadata: dict[str, str] | None = None,
                    on_tensor: Callable[[Planned, int], None] | None = None) -> int:
    """Write a safetensors file tensor by tensor; returns the bytes of tensor data written.

    The header is computed from the planned shapes first; each array is produced, checked
    against its plan and written, then dropped. Tensors are laid out in the order given.
    """
    tensors = list(tensors)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for t in tensors:
        nbytes = int(np.prod(t.shape, dtype=np.int64)) * NUMPY_VIEW[t.dtype].itemsize
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            arr = contiguous(t.produce())
            if arr.dtype != NUMPY_VIEW[t.dtype] or tuple(arr.shape) != t.shape:
                raise SafetensorsError(path, f"tensor {t.name!r} came out {arr.dtype} {list(arr.shape)}, "
                                       f"planned {t.dtype} {list(t.shape)}")
            f.write(memoryview(arr).cast("B"))
            if on_tensor:
                on_tensor(t, arr.nbytes)
            del arr
    return offset


def contiguous(a: np.ndarray) -> np.ndarray:
    """C-contiguous without changing the shape (np.ascontiguousarray turns a scalar into (1,))."""
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def bf16_from_f32(words: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 with round-to-nearest-even, as torch and paddle cast (NaN stays NaN)."""
    u = words.view(np.uint32) if words.dtype != np.uint32 else words
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, ((u >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16), rounded)


def f32_from_bf16(words: np.ndarray) -> np.ndarray:
    """bf16 words -> fp32 (exact)."""
    return (words.astype(np.uint32) << np.uint32(16)).view(np.float32)


# safetensors has no complex dtype: a complex array is stored as its float view with a
# trailing axis of 2 (real, imaginary), and the file's metadata names those tensors.
_COMPLEX_KEYS = "align.complex"


def save_arrays(arrays: dict[str, np.ndarray], path: Path | str) -> None:
    """save_file, with complex arrays stored as (..., 2) float pairs (see load_arrays)."""
    from safetensors.numpy import save_file

    complex_keys = sorted(k for k, v in arrays.items() if np.iscomplexobj(v))
    stored = {k: contiguous(np.ascontiguousarray(v).view(v.real.dtype).reshape(*v.shape, 2))
              if k in complex_keys else contiguous(v) for k, v in arrays.items()}
    save_file(stored, str(path), metadata={_COMPLEX_KEYS: json.dumps(complex_keys)} if complex_keys else None)


def load_arrays(path: Path | str) -> dict[str, np.ndarray]:
    """load_file, with the complex arrays save_arrays stored made complex again."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            complex_keys = set(json.loads((f.metadata() or {}).get(_COMPLEX_KEYS, "[]")))
            out = {}
            for k in f.keys():
                arr = f.get_tensor(k)
                if k in complex_keys:
                    wide = np.complex64 if arr.dtype == np.float32 else np.complex128
                    arr = np.ascontiguousarray(arr).view(wide).reshape(arr.shape[:-1])
                out[k] = arr
    except FileNotFoundError:
        raise ConfigError(path, "", "missing") from None
    except (SafetensorError, json.JSONDecodeError, ValueError) as e:
        raise ConfigError(path, "", f"not a readable safetensors file: {one_line(e)}") from None
    return out
