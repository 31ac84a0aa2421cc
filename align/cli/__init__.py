"""The `align` command: a thin shell over the execution core (align.core) and the reports.

parser.py declares the commands and options; commands.py runs them (run, check, trace, gate,
report, convert); weights.py the `align weights` ones; shell.py what they share (the
registry, the progress line). Exit codes (align.gate.ExitCode): 0 aligned, 1 not aligned (or
could not run what was asked), 2 usage or config error, 3 align itself failed. A user mistake gets one line on
stderr naming the file and key, never a traceback; a failure of align itself is exit 3, one
line saying in which step, and the traceback in a log file whose path the line gives.
"""

from __future__ import annotations

import sys

from rich.console import Console

from align.cli.commands import check, convert, gate, render, run, trace
from align.cli.parser import build_parser
from align.cli.shell import crash_log, failed_step, registry_of
from align.cli.weights import weights
from align.errors import ConfigError, WeightError, one_line
from align.gate import ExitCode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)  # long lines stay whole: CI logs get grepped
    if not console.is_terminal:
        console.width = max(console.width, 120)  # CI logs are not 80 columns wide
    try:
        if args.command == "list":
            for name, spec in registry_of(args).models.items():
                print(f"{name}\t{'ci' if spec.ci else '-'}\t{spec.description}")
            return ExitCode.ALIGNED
        if args.command == "gate":
            return gate(args, console)
        if args.command == "report":
            return render(args, console)
        if args.command == "weights":
            return weights(args, console)
        if args.command == "convert":
            return convert(args, console)
        if args.command == "trace":
            return trace(args, console)
        if args.command == "check":
            return check(args, argv, console)
        return run(args, argv, console)
    except (ConfigError, WeightError) as e:
        print(f"align: error: {e}", file=sys.stderr)
        return ExitCode.USAGE_ERROR
    except KeyboardInterrupt:
        print("align: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - align itself failed: one line, the traceback in a log
        log = crash_log(e, argv)
        print(f"align: internal error in {failed_step(e)}: {type(e).__name__}: {one_line(e)} "
              f"(the traceback is in {log}; please report it)", file=sys.stderr)
        return ExitCode.INTERNAL_ERROR
