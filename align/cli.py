"""The `align` command: a thin shell over align.run and align.report.

Exit codes: 0 aligned, 1 not aligned (or could not run what was asked), 2 usage or config
error. A user mistake gets one line on stderr naming the file and key, never a traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from enum import IntEnum
from pathlib import Path

from rich.console import Console

from align.spec import ConfigError, find_registry, load_registry
from align.weights import WeightError


class ExitCode(IntEnum):
    ALIGNED = 0
    NOT_ALIGNED = 1
    USAGE_ERROR = 2


DTYPE_ALIASES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="align", description="Prove a Paddle port computes what its torch reference computes.")
    p.add_argument("--registry", type=Path, help="the align.toml to use (default: nearest one above the working directory)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("list", help="list the models in align.toml")

    run = sub.add_parser("run", help="align one model and write reports/<model>/")
    run.add_argument("model")
    run.add_argument("--dtype", action="append", choices=sorted(DTYPE_ALIASES),
                     help="dtype to run (repeatable; default: the model's dtypes in align.toml)")
    run.add_argument("--port", default="hand", choices=["hand"], help="which port to align (default: hand)")
    run.add_argument("--config", default="tiny", help="a config table of the model, or a config.json path (default: tiny)")
    run.add_argument("--checkpoint", type=Path, help="reference weights (safetensors file or sharded directory) instead of seeded random ones")
    run.add_argument("--out", type=Path, help="report directory (default: reports/<model>/ beside align.toml)")
    run.add_argument("--quiet", action="store_true", help="no progress display")
    return p


def _run(args: argparse.Namespace, console: Console) -> ExitCode:
    from align.report import render_console, write_report
    from align.run import align_model

    registry = load_registry(args.registry or find_registry())
    spec = registry.get(args.model)
    dtypes = tuple(dict.fromkeys(DTYPE_ALIASES[d] for d in args.dtype)) if args.dtype else None
    command = "align " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else f"align run {spec.name}"
    with console.status("aligning", spinner="dots") as status:
        def progress(step: str) -> None:
            if not args.quiet:
                status.update(f"{spec.name}: {step}")

        result = align_model(spec, args.config, dtypes, args.checkpoint, progress, command)
    out = args.out or registry.source.parent / "reports" / spec.name
    report = result.to_dict()
    if result.repro is not None:
        report["repro"] = str(result.repro.write(out / "repro").relative_to(out))
    paths = write_report(report, out)
    render_console(report, console, paths)
    return ExitCode.ALIGNED if report["verdict"] == "pass" else ExitCode.NOT_ALIGNED


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(stderr=True)
    if not console.is_terminal:
        console.width = max(console.width, 120)  # CI logs are not 80 columns wide
    try:
        if args.command == "list":
            registry = load_registry(args.registry or find_registry())
            for name, spec in registry.models.items():
                print(f"{name}\t{'ci' if spec.ci else '-'}\t{spec.description}")
            return ExitCode.ALIGNED
        return _run(args, console)
    except (ConfigError, WeightError) as e:
        print(f"align: error: {e}", file=sys.stderr)
        return ExitCode.USAGE_ERROR
    except KeyboardInterrupt:
        print("align: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
