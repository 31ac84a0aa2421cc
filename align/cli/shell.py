"""What the commands share: the registry they read, the progress line they show, and the
account of a failure of align itself (the step it failed in, a log with its traceback)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from rich.console import Console

from align.cli.parser import UsageError
from align.errors import ConfigError, WeightError
from align.registry.load import find_registry, load_registry
from align.registry.spec import ModelSpec, Registry


@contextmanager
def held_logs(name: str = "transformers") -> Iterator[None]:
    """Hold what the logger `name` (the reference package's) says during a command: said at
    the end, unless the command ends in a user's mistake, whose one line says what went wrong
    (transformers' warnings about the same bad value would only bury it). The logger's own
    handlers are restored either way."""
    try:  # the library sets its own handler up when first used: have it set up now, to hold it too
        importlib.import_module(f"{name}.utils.logging").get_logger()
    except (ImportError, AttributeError):
        pass
    logger = logging.getLogger(name)
    held = _Held()
    handlers, propagate = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [held], False
    try:
        yield
    except (ConfigError, WeightError, UsageError):
        held.records.clear()
        raise
    finally:
        logger.handlers, logger.propagate = handlers, propagate
        for record in held.records:
            logger.handle(record)


class _Held(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def registry_of(args: argparse.Namespace) -> Registry:
    return load_registry(args.registry or find_registry())


def judged_as_asked(spec: ModelSpec, args: argparse.Namespace) -> ModelSpec:
    """The spec, judged by the literal tolerance alone if the command line says --strict."""
    if not getattr(args, "strict", False) or spec.noise_floor is None:
        return spec
    return dataclasses.replace(spec, noise_floor=dataclasses.replace(spec.noise_floor, strict=True))


def progress_of(console: Console, name: str, quiet: bool):
    """A rich status line for long steps, as a context manager yielding progress(step)."""

    @contextmanager
    def show():
        with console.status("aligning", spinner="dots") as status:
            yield (lambda step: None) if quiet else (lambda step: status.update(f"{name}: {step}"))

    return show()


def failed_step(e: BaseException) -> str:
    """The pipeline step align failed in: the package of the innermost frame of align's own
    code in the traceback ("capture (force.py)")."""
    package = Path(__file__).resolve().parents[1]
    step = "the command line"
    tb = e.__traceback__
    while tb is not None:
        path = Path(tb.tb_frame.f_code.co_filename).resolve()
        if package in path.parents:
            inner = path.relative_to(package).parts
            step = f"{inner[0]} ({inner[1]})" if len(inner) > 1 else inner[0]
        tb = tb.tb_next
    return step


def crash_log(e: BaseException, argv: list[str]) -> Path:
    """Write the traceback of a failure of align itself to a log file in the temporary
    directory, whole or not at all; returns its path."""
    from align.atomic import write_atomic

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(tempfile.gettempdir()) / f"align-crash-{stamp}-{os.getpid()}.log"
    text = f"align {' '.join(argv)}\n\n" + "".join(traceback.format_exception(e))
    try:
        write_atomic(path, text)
    except OSError:
        return Path("(could not be written)")
    return path
