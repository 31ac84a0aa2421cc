import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "align.toml"


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
