"""What the commands share: the registry they read and the progress line they show."""

from __future__ import annotations

import argparse
from contextlib import contextmanager

from rich.console import Console

from align.registry.load import find_registry, load_registry
from align.registry.spec import Registry


def registry_of(args: argparse.Namespace) -> Registry:
    return load_registry(args.registry or find_registry())


def progress_of(console: Console, name: str, quiet: bool):
    """A rich status line for long steps, as a context manager yielding progress(step)."""

    @contextmanager
    def show():
        with console.status("aligning", spinner="dots") as status:
            yield (lambda step: None) if quiet else (lambda step: status.update(f"{name}: {step}"))

    return show()
