"""PaConvert, run from its own environment as a subprocess on one source file, and its log
read back into which torch API uses it converted and which it did not."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from align.errors import ConfigError

PACONVERT_VENV = ".venv-paconvert"


@dataclass(frozen=True)
class ApiUse:
    """One torch API, how often the reference uses it, and what PaConvert made of it."""

    name: str
    count: int
    paddle: str | None  # None: not converted
    lines: tuple[int, ...] = ()  # in the reference file
    file: str = ""  # the generated file its module became

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def paconvert_command(root: Path) -> Path:
    exe = root / PACONVERT_VENV / "bin" / "paconvert"
    if not exe.is_file():
        raise ConfigError(root / PACONVERT_VENV, "", "PaConvert is not installed here; create it with "
                                                     "`make venv-paconvert`")
    return exe


def run_paconvert(exe: Path, source: Path, workdir: Path) -> tuple[str, str, str]:
    """(draft, log, version): PaConvert on one file, in its own environment."""
    src = workdir / source.name
    shutil.copyfile(source, src)
    out, log = workdir / "draft.py", workdir / "paconvert.log"
    # In the work directory: --show_all_api also drops a spreadsheet into the current directory.
    proc = subprocess.run([str(exe), "-i", str(src), "-o", str(out), "--log_dir", str(log), "--show_all_api"],
                          capture_output=True, text=True, cwd=workdir)
    if proc.returncode != 0 or not out.is_file() or not log.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(source, "", f"PaConvert failed (exit code {proc.returncode}): {tail[0]}")
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True, cwd=workdir).stdout.strip()
    return out.read_text(), log.read_text(), version.split()[-1].lstrip("v") if version else "unknown"


_USE = re.compile(r"^\[[^:\]]+:(\d+)\] \[(Success|Not Support)\] (?:Convert|convert) (?:Class Method: |Class Attribute: )?"
                  r"(\S+) to Paddle")


_ALL = re.compile(r"^(torch\S*)\s+(paddle\S*)\s+(\d+)\s*$")


_TOTAL = re.compile(r"There are (\d+) Pytorch APIs")


_DONE = re.compile(r"^\s*(\d+)\s+Pytorch APIs have been converted")


def parse_log(log: str) -> tuple[list[ApiUse], list[ApiUse], int, int]:
    """(converted, unconverted, total, converted count) from PaConvert's log. The per-use
    lines give names and lines; the summary gives totals, which must agree with them."""
    uses: dict[tuple[str, bool], list[int]] = {}
    for line in log.splitlines():
        if m := _USE.match(line):
            uses.setdefault((m.group(3), m.group(2) == "Success"), []).append(int(m.group(1)))
    targets = {m.group(1): m.group(2) for line in log.splitlines() if (m := _ALL.match(line))}
    total = int(m.group(1)) if (m := _TOTAL.search(log)) else None
    done = next((int(m.group(1)) for line in log.splitlines() if (m := _DONE.match(line))), None)
    converted = sorted((ApiUse(n, len(ls), targets.get(n, "?"), tuple(sorted(set(ls))))
                        for (n, ok), ls in uses.items() if ok), key=lambda u: (-u.count, u.name))
    unconverted = sorted((ApiUse(n, len(ls), None, tuple(sorted(set(ls))))
                          for (n, ok), ls in uses.items() if not ok), key=lambda u: (-u.count, u.name))
    counted = sum(u.count for u in converted), sum(u.count for u in unconverted)
    if total is None or done is None or (done, total - done) != counted:
        raise ValueError(f"PaConvert's log does not add up: summary {done}/{total}, per-use lines "
                         f"{counted[0]} converted + {counted[1]} not (has its log format changed?)")
    return converted, unconverted, total, done
