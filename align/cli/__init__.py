"""The `align` command: a thin shell over the execution core (align.core) and the reports.

parser.py declares the commands and options; commands.py runs them (run, check, trace, gate,
report, convert); weights.py the `align weights` ones; shell.py what they share (the
registry, the progress line). Exit codes (align.gate.ExitCode): 0 aligned, 1 not aligned (or
could not run what was asked), 2 usage or config error, 3 align itself failed. A user mistake gets one line on
stderr naming the file and key, never a traceback; a failure of align itself is exit 3, one
line saying in which step, and the traceback in a log file whose path the line gives.
"""

from __future__ import annotations

import errno
import sys

from rich.console import Console

from align.cli.commands import check, convert, gate, port_modules, render, run, trace
from align.cli.parser import UsageError, build_parser
from align.cli.shell import crash_log, failed_step, held_logs, registry_of
from align.cli.weights import weights
from align.errors import ConfigError, WeightError, one_line
from align.gate import ExitCode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(f"align: error: {e}", file=sys.stderr)
        return ExitCode.USAGE_ERROR
    console = Console(stderr=True, soft_wrap=True)  # long lines stay whole: CI logs get grepped
    if not console.is_terminal:
        console.width = max(console.width, 120)  # CI logs are not 80 columns wide
    try:
        if args.command in ("list", "report"):  # they build no model: nothing to hold
            return _command(args, argv, console)
        with held_logs():
            return _command(args, argv, console)
    except (ConfigError, WeightError) as e:
        print(f"align: error: {e}", file=sys.stderr)
        return ExitCode.USAGE_ERROR
    except KeyboardInterrupt:
        print("align: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        line = environment_failure(e)
        if line is None:
            return _internal(e, argv)
        print(f"align: error: {line}", file=sys.stderr)
        return ExitCode.USAGE_ERROR
    except Exception as e:  # noqa: BLE001 - align itself failed: one line, the traceback in a log
        return _internal(e, argv)


def _command(args, argv: list[str], console: Console) -> int:
    if args.command == "list":
        for name, spec in registry_of(args).models.items():
            print(f"{name}\t{'ci' if spec.ci else '-'}\t{spec.description}")
        return ExitCode.ALIGNED
    commands = {"gate": lambda: gate(args, console), "report": lambda: render(args, console),
                "weights": lambda: weights(args, console), "convert": lambda: convert(args, console),
                "trace": lambda: trace(args, console), "check": lambda: check(args, argv, console),
                "port-modules": lambda: port_modules(args)}
    return commands.get(args.command, lambda: run(args, argv, console))()


# What the machine, not align or the user's files, refused: a full disk, a read-only or
# forbidden place, a file where a folder must go. One line naming the path and the cause.
_ENVIRONMENT = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.EMFILE, errno.ENFILE, errno.EIO, errno.ENOENT}


def environment_failure(e: OSError) -> str | None:
    """The one line for an OSError the environment caused (None: align's own failure)."""
    if e.errno not in _ENVIRONMENT:
        return None
    where = e.filename if e.filename is not None else "(writing)"
    return f"{where}: {e.strerror or type(e).__name__}"


def _internal(e: BaseException, argv: list[str]) -> int:
    log = crash_log(e, argv)
    print(f"align: internal error in {failed_step(e)}: {type(e).__name__}: {one_line(e)} "
          f"(the traceback is in {log}; please report it)", file=sys.stderr)
    return ExitCode.INTERNAL_ERROR
