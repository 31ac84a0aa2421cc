"""The `align` command: a thin shell over align.run and align.report.

Exit codes: 0 aligned, 1 not aligned (or could not run what was asked), 2 usage or config
error. A user mistake gets one line on stderr naming the file and key, never a traceback.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from enum import IntEnum
from pathlib import Path

from rich.console import Console
from rich.table import Table

from align.spec import ConfigError, ModelSpec, Registry, find_registry, load_registry
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

    gate = sub.add_parser("gate", help="align every model marked ci = true; exit 1 if any is not aligned")
    gate.add_argument("--junit", type=Path, help="also write JUnit XML here (one test case per model, dtype and mode)")
    gate.add_argument("--reports", type=Path, help="reports directory (default: reports/ beside align.toml)")
    gate.add_argument("--quiet", action="store_true", help="no progress display")

    report = sub.add_parser("report", help="work with written reports")
    report_sub = report.add_subparsers(dest="report_command", required=True, metavar="ACTION")
    render = report_sub.add_parser("render", help="re-render report.html (and JUnit) from a report.json alone")
    render.add_argument("path", type=Path, help="a report.json, or the directory holding it")
    render.add_argument("--junit", type=Path, help="also write JUnit XML here")
    return p


def _registry(args: argparse.Namespace) -> Registry:
    return load_registry(args.registry or find_registry())


def _align_and_write(spec: ModelSpec, out: Path, console: Console, quiet: bool, command: str,
                     config: str = "tiny", dtypes: tuple[str, ...] | None = None,
                     checkpoint: Path | None = None) -> dict:
    """Align one model; write report.json, report.html, the repro, the history line and the dashboard."""
    from align.report import append_history, as_json, render_console, write_index, write_report
    from align.run import align_model

    started = time.perf_counter()
    with console.status("aligning", spinner="dots") as status:
        def progress(step: str) -> None:
            if not quiet:
                status.update(f"{spec.name}: {step}")

        result = align_model(spec, config, dtypes, checkpoint, progress, command)
    report = result.to_dict()
    report["duration_s"] = round(time.perf_counter() - started, 3)
    if result.repro is not None:
        report["repro"] = str(result.repro.write(out / "repro").relative_to(out))
    elif (out / "repro").is_dir():
        shutil.rmtree(out / "repro")  # a passing run leaves no stale repro of an old failure behind
    report = as_json(report)
    paths = write_report(report, out)
    append_history(report, out.parent)
    index = write_index(out.parent)
    render_console(report, console, (*paths, index))
    return report


def _run(args: argparse.Namespace, argv: list[str], console: Console) -> ExitCode:
    registry = _registry(args)
    spec = registry.get(args.model)
    dtypes = tuple(dict.fromkeys(DTYPE_ALIASES[d] for d in args.dtype)) if args.dtype else None
    out = args.out or registry.source.parent / "reports" / spec.name
    report = _align_and_write(spec, out, console, args.quiet, "align " + " ".join(shlex.quote(a) for a in argv),
                              args.config, dtypes, args.checkpoint)
    return ExitCode.ALIGNED if report["verdict"] == "pass" else ExitCode.NOT_ALIGNED


def _gate(args: argparse.Namespace, console: Console) -> ExitCode:
    from align.junit import render_junit
    from align.report import write_atomic

    registry = _registry(args)
    gated = [spec for spec in registry.models.values() if spec.ci]
    if not gated:
        raise ConfigError(registry.source, "models", "no model is marked ci = true: the gate would check nothing")
    root = args.reports or registry.source.parent / "reports"
    reports = [_align_and_write(spec, root / spec.name, console, args.quiet, f"align run {spec.name}")
               for spec in gated]
    if args.junit:
        write_atomic(args.junit, render_junit(reports))
    table = Table(title="align gate", show_edge=False)
    for col in ("model", "verdict", "culprits"):
        table.add_column(col)
    for r in reports:
        c = r["culprits"]
        table.add_row(r["model"], r["verdict"], ", ".join(c["forward"] + c["backward"]) or "-")
    console.print(table)
    if args.junit:
        console.print(f"wrote {args.junit}")
    return ExitCode.ALIGNED if all(r["verdict"] == "pass" for r in reports) else ExitCode.NOT_ALIGNED


def _render(args: argparse.Namespace, console: Console) -> ExitCode:
    from align.html import render_html
    from align.junit import render_junit
    from align.report import load_report, write_atomic

    path = args.path / "report.json" if args.path.is_dir() else args.path
    try:
        report = load_report(path)
    except FileNotFoundError:
        raise ConfigError(path, "", "no such report") from None
    except ValueError as e:
        raise ConfigError(path, "", f"not a report.json: {e}") from None
    if not isinstance(report, dict) or "schema_version" not in report:
        raise ConfigError(path, "schema_version", "missing: not a report.json written by align")
    html_path = path.parent / "report.html"
    write_atomic(html_path, render_html(report))
    console.print(f"wrote {html_path}")
    if args.junit:
        write_atomic(args.junit, render_junit([report]))
        console.print(f"wrote {args.junit}")
    return ExitCode.ALIGNED if report["verdict"] == "pass" else ExitCode.NOT_ALIGNED


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    console = Console(stderr=True)
    if not console.is_terminal:
        console.width = max(console.width, 120)  # CI logs are not 80 columns wide
    try:
        if args.command == "list":
            for name, spec in _registry(args).models.items():
                print(f"{name}\t{'ci' if spec.ci else '-'}\t{spec.description}")
            return ExitCode.ALIGNED
        if args.command == "gate":
            return _gate(args, console)
        if args.command == "report":
            return _render(args, console)
        return _run(args, argv, console)
    except (ConfigError, WeightError) as e:
        print(f"align: error: {e}", file=sys.stderr)
        return ExitCode.USAGE_ERROR
    except KeyboardInterrupt:
        print("align: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
