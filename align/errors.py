"""The errors a user can cause, each naming the file, key or tensor at fault. Every layer raises
them; the CLI turns them into one line and exit code 2."""

from __future__ import annotations

from pathlib import Path


class ConfigError(Exception):
    """A mistake in align.toml or a rules file: names the file and the dotted key."""

    def __init__(self, file: Path | str, key: str, message: str):
        self.file, self.key, self.message = str(file), key, message
        super().__init__(f"{self.file}: {key}: {message}" if key else f"{self.file}: {message}")


class WeightError(Exception):
    """A weight that cannot be mapped, loaded or verified; names the tensor and the rule."""


def one_line(e: BaseException) -> str:
    """An exception's message, its first line, for a one-line account."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else "(no message)"
