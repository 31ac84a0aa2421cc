"""Whole or not at all: a file or a folder is written under a temporary name beside its
destination and renamed into place, so a crash never leaves a half-written one that looks complete."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_TAG = "align-tmp"


def temp_name(name: str, pid: int | None = None) -> str:
    """The hidden name of a temporary beside `name`, tagged with the process that owns it."""
    return f".{name}.{_TAG}-{os.getpid() if pid is None else pid}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def clean_stale(directory: Path, name: str) -> None:
    """Remove the temporaries beside `name` that a process now dead left (killed before it
    could rename or remove them). Another run's, still alive, are left alone."""
    prefix = f".{name}.{_TAG}-"
    try:
        entries = list(directory.iterdir())
    except OSError:
        return
    for p in entries:
        if not p.name.startswith(prefix):
            continue
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def temp_beside(dest: Path, directory: bool = False) -> Path:
    """A new temporary file (or folder) beside `dest`, once stale ones are cleaned; it is
    renamed onto `dest` when complete, or removed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest.parent, dest.name)
    tmp = dest.parent / temp_name(dest.name)
    if directory:
        tmp.mkdir(mode=0o700)
    else:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    return tmp


@contextmanager
def scratch(kind: str) -> Iterator[Path]:
    """A private scratch folder in the system's temporary directory (spilled gradients, a
    trace between two processes), removed on exit; one a killed run left is removed by the
    next run that makes one of its kind."""
    tmp = temp_beside(Path(tempfile.gettempdir()) / f"align-{kind}", directory=True)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_atomic(path: Path, text: str) -> None:
    tmp = temp_beside(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # created 0600, private until whole; a report is meant to be shared
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise naming(e, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_folder(out_dir: Path, fill: Callable[[Path], None]) -> Path:
    """Write the folder `out_dir` whole or not at all: `fill` writes its files into a fresh
    temporary folder beside it, which then replaces `out_dir` (and whatever it held)."""
    tmp = temp_beside(out_dir, directory=True)
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise naming(e, out_dir) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def naming(e: OSError, path: Path) -> OSError:
    """The error, naming the destination the user gave when it names no file (a write that
    ran out of space names none) or only one of align's hidden temporaries."""
    if e.filename is None or f".{_TAG}-" in str(e.filename):
        return type(e)(e.errno, e.strerror, str(path))
    return e
