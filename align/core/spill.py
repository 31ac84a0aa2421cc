"""Large reference gradients set aside on disk while a streamed run works through its blocks."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from align.compare.metrics import CHUNK
from align.core.judged import Progress

# A reference shell gradient at least this large waits on disk while the blocks run (Spill).
SPILL_BYTES = 1 << 28


def in_memory(path: Path, mountinfo: list[str] | None = None) -> bool:
    """Whether `path` lies on a filesystem held in memory (tmpfs, ramfs: /tmp on many
    distributions), where a gradient set aside would take as much memory as before."""
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo") as f:
                mountinfo = f.readlines()
        except OSError:
            return False
    target, best, kind = str(path.resolve()), -1, ""
    for line in mountinfo:
        fields, _, rest = line.partition(" - ")
        point = fields.split()[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best and rest.split():  # the last mount on a point is the one seen
            best, kind = len(point), rest.split()[0]
    return kind in ("tmpfs", "ramfs")


class Spill:
    """The reference shell's large parameter gradients, set aside on disk from the end of
    the reference's first pass until the port's shell is judged against them, memory-mapped
    back then. Without it they sit in memory through every block's pass and next to the
    port's whole shell: a full-size Gemma2's tied embedding gradient alone is 2.36 GB.

    The first pass leaves in them what the code above the blocks sent back (the tied head's
    part); it is written out and the gradient cleared. What the blocks' backward adds later
    (the embedding lookup's part, from the first block) is summed back in at the end, in the
    gradient's float dtype as torch accumulates it: a + b equals b + a exactly, so with one
    later part the total is bitwise what torch would have held."""

    def __init__(self, directory: str, progress: Progress):
        self.dir, self.progress = Path(directory), progress
        self.early: dict[str, tuple[Path, np.dtype, tuple[int, ...]]] = {}
        self.files = 0
        self.in_memory = in_memory(self.dir)
        self.told: set[str] = set()  # the gradients kept in memory, each said once

    def write(self, arr: np.ndarray, path: Path | None = None) -> Path:
        if path is None:
            path, self.files = self.dir / f"{self.files}.bin", self.files + 1
        with open(path, "wb") as f:
            arr.tofile(f)
        return path

    def _spillable(self, fw: Any, name: str, g: Any) -> bool:
        """A contiguous float gradient of at least SPILL_BYTES, with room for it on disk."""
        if fw.nbytes(g) < SPILL_BYTES or fw.dtype_name(g) not in ("float32", "float64") or not g.is_contiguous():
            return False
        why = (f"{self.dir} is itself in memory (tmpfs); a TMPDIR on disk lowers the peak" if self.in_memory
               else f"too little free space in {self.dir}" if shutil.disk_usage(self.dir).free < fw.nbytes(g) + (1 << 30)
               else None)
        if why is not None and name not in self.told:
            self.told.add(name)
            self.progress(f"reference: {name}'s gradient kept in memory: {why}")
        return why is None

    def set_aside(self, fw: Any, params: dict[str, Any]) -> None:
        """Write out, and clear, each gradient that is _spillable."""
        for name, p in params.items():
            if p.grad is not None and self._spillable(fw, name, p.grad):
                arr = fw.view(p.grad)
                self.early[name] = (self.write(arr), arr.dtype, arr.shape)
                p.grad = None
        if self.early:
            gb = sum(path.stat().st_size for path, _, _ in self.early.values()) / 1e9
            self.progress(f"reference: {gb:.2f} GB of its shell's gradients set aside in {self.dir}")

    def totals(self, fw: Any, grads: dict[str, Any]) -> dict[str, np.ndarray]:
        """Each parameter's whole gradient, from `grads` (what each .grad holds now; the
        caller's other references to them must be gone for their memory to go). Whatever
        was set aside, or is _spillable, is memory-mapped from disk, with any later part
        added in first (a gradient the blocks' backward alone sent, such as an untied
        embedding's, goes straight to disk rather than being copied); the rest is copied."""
        out = {}
        for name in list(grads):
            later = grads.pop(name)
            early = self.early.get(name)
            if early is None and (later is None or not self._spillable(fw, name, later)):
                if later is not None:
                    out[name] = fw.record(later).data
                continue
            if later is not None:
                total = fw.view(later)  # the gradient's own buffer, summed into in place
                if early is not None:
                    flat = total.reshape(-1)
                    with open(early[0], "rb") as f:
                        for start in range(0, flat.size, CHUNK):
                            part = np.fromfile(f, early[1], min(CHUNK, flat.size - start))
                            np.add(flat[start:start + part.size], part, out=flat[start:start + part.size])
                early = (self.write(total, early[0] if early else None), total.dtype, total.shape)
                del later, total
            out[name] = np.memmap(early[0], early[1], "r", shape=early[2])
        return out
