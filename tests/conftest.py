import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "align.toml"


def after_init(monkeypatch, cls, change):
    """Break a port class for one test: every new instance gets change(self, *init_args) right
    after its own __init__ (a test-scoped patch; the port's source is never edited)."""
    init = cls.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        change(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__init__", patched)


@pytest.fixture
def run_cli(tmp_path, capsys):
    """Run `align` in-process (so test-scoped patches apply); returns (exit code, report, stderr)."""
    from align.cli import main

    def run(*args: str):
        out = tmp_path / "report"
        code = main(["--registry", str(REGISTRY), *args, "--out", str(out), "--quiet"])
        err = capsys.readouterr().err
        path = out / "report.json"
        return code, (json.loads(path.read_text()) if path.exists() else None), err

    return run


class BugLedger:
    """What the injected-bug suite found, for the rates printed at the end of the run."""

    def __init__(self):
        self.bugs: dict[str, tuple[str, bool, bool]] = {}
        self.clean: dict[str, bool] = {}

    def record(self, bug: str, kind: str, detected: bool, localized: bool) -> None:
        self.bugs[bug] = (kind, detected, localized)

    def record_clean(self, case: str, false_alarm: bool) -> None:
        self.clean[case] = false_alarm


_LEDGER = BugLedger()


@pytest.fixture
def bug_ledger():
    return _LEDGER


def pytest_terminal_summary(terminalreporter):
    if not _LEDGER.bugs and not _LEDGER.clean:
        return
    n = len(_LEDGER.bugs)
    detected = sum(d for _, d, _ in _LEDGER.bugs.values())
    localized = sum(d and loc for _, d, loc in _LEDGER.bugs.values())
    kinds = len({k for k, _, _ in _LEDGER.bugs.values()})
    alarms = sum(_LEDGER.clean.values())
    terminalreporter.write_sep("-", "injected-bug suite")
    terminalreporter.write_line(f"bugs injected: {n} ({kinds} kinds); detected {detected}/{n}; "
                                f"localized to the module that holds the bug {localized}/{n}")
    terminalreporter.write_line(f"correct-port runs: {len(_LEDGER.clean)}; false alarms {alarms}")
    for bug, (kind, d, loc) in sorted(_LEDGER.bugs.items()):
        if not (d and loc):
            terminalreporter.write_line(f"  MISSED {bug} ({kind}): detected={d} localized={loc}")
