import fnmatch
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


def localized_to(code: int, report: dict, culprit: str, direction: str) -> tuple[bool, bool]:
    """Whether a broken port's run failed, and whether its teacher-forced first divergence and
    every culprit in `direction` match the glob `culprit`."""
    fd, culprits = report["first_divergence"], report["culprits"]
    detected = code == 1 and report["verdict"] == "fail"
    localized = (fd["mode"] == "teacher_forced" and fd[direction] is not None
                 and fnmatch.fnmatchcase(fd[direction], culprit)
                 and all(fnmatch.fnmatchcase(c, culprit) for c in culprits[direction]))
    return detected, localized


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
        self.bugs: dict[tuple[str, str], tuple[str, bool, bool]] = {}  # (bug, config) -> kind, detected, localized
        self.clean: dict[tuple[str, str], bool] = {}
        self.below: set[tuple[str, str]] = set()  # (bug, config): its effect is below the literal tolerance there

    def record(self, bug: str, kind: str, detected: bool, localized: bool, config: str = "tiny",
               below_literal: bool = False) -> None:
        if below_literal:
            self.below.add((bug, config))
        else:
            self.bugs[bug, config] = (kind, detected, localized)

    def record_clean(self, case: str, false_alarm: bool, config: str = "tiny") -> None:
        self.clean[case, config] = false_alarm


_LEDGER = BugLedger()


@pytest.fixture
def bug_ledger():
    return _LEDGER


def pytest_terminal_summary(terminalreporter):
    if not _LEDGER.bugs and not _LEDGER.clean:
        return
    terminalreporter.write_sep("-", "injected-bug suite")
    configs = sorted({c for _, c in _LEDGER.bugs} | {c for _, c in _LEDGER.clean}, key=lambda c: (c != "tiny", c))
    for config in configs:
        bugs = {b: v for (b, c), v in _LEDGER.bugs.items() if c == config}
        clean = {b: v for (b, c), v in _LEDGER.clean.items() if c == config}
        n = len(bugs)
        detected = sum(d for _, d, _ in bugs.values())
        localized = sum(d and loc for _, d, loc in bugs.values())
        kinds = len({k for k, _, _ in bugs.values()})
        terminalreporter.write_line(f"{config}: bugs injected: {n} ({kinds} kinds); detected {detected}/{n}; "
                                    f"localized to the module that holds the bug {localized}/{n}; "
                                    f"correct-port runs: {len(clean)}; false alarms {sum(clean.values())}")
        below = sorted(b for b, c in _LEDGER.below if c == config)
        if below:
            terminalreporter.write_line(f"  {config}: {len(below)} more injected, whose effect here is below the "
                                        f"literal tolerance (passed by it, as any rule must): {', '.join(below)}")
    for (bug, config), (kind, d, loc) in sorted(_LEDGER.bugs.items()):
        if not (d and loc):
            terminalreporter.write_line(f"  MISSED {bug} at {config} ({kind}): detected={d} localized={loc}")
    for (case, config), alarm in sorted(_LEDGER.clean.items()):
        if alarm:
            terminalreporter.write_line(f"  FALSE ALARM {case} at {config}")
