"""Step 8, the gate: the models CI aligns, and one exit code for what they gave.

Exit codes, as pytest's ExitCode: 0 aligned, 1 not aligned, 2 the user's mistake (a usage or
config error, reported in one line that names the file and key), 3 align itself failed (one
line naming the step, the traceback in a log).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum

from align.errors import ConfigError
from align.registry.spec import ModelSpec, Registry


class ExitCode(IntEnum):
    ALIGNED = 0
    NOT_ALIGNED = 1
    USAGE_ERROR = 2
    INTERNAL_ERROR = 3


def gated(registry: Registry) -> list[ModelSpec]:
    """The models marked ci = true; none is an error, since the gate would check nothing."""
    models = [spec for spec in registry.models.values() if spec.ci]
    if not models:
        raise ConfigError(registry.source, "models", "no model is marked ci = true: the gate would check nothing")
    return models


def exit_code(reports: Iterable[dict]) -> ExitCode:
    """ALIGNED when every report (there is at least one) says pass."""
    verdicts = [r["verdict"] for r in reports]
    return ExitCode.ALIGNED if verdicts and all(v == "pass" for v in verdicts) else ExitCode.NOT_ALIGNED
