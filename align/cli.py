"""The `align` command: a thin shell over the execution core (align.core) and the reports.

Exit codes (align.gate.ExitCode): 0 aligned, 1 not aligned (or could not run what was
asked), 2 usage or config error. A user mistake gets one line on stderr naming the file and
key, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from align.errors import ConfigError, WeightError
from align.gate import ExitCode, exit_code, gated
from align.registry.load import find_registry, load_registry
from align.registry.spec import ModelSpec, Registry

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
    run.add_argument("--port", action="append", choices=["hand", "converted", "all"],
                     help="which port to align (repeatable; default: hand). `converted` is the port `align convert` "
                          "generated; two or more ports are aligned against one reference run, side by side")
    run.add_argument("--config", help="a config of the model, or a config.json path (default: the model's default_config)")
    run.add_argument("--checkpoint", type=Path, help="reference weights (safetensors file or sharded directory) instead of seeded random ones")
    run.add_argument("--out", type=Path, help="report directory (default: reports/<model>/ beside align.toml)")
    run.add_argument("--quiet", action="store_true", help="no progress display")
    run.add_argument("--only", action="append", default=[], metavar="GLOB",
                     help="report only the modules matching GLOB (repeatable), e.g. model.layers.3.mlp* "
                          "(a focused, partial check while fixing one culprit)")
    run.add_argument("--keep", action="append", default=[], metavar="GLOB",
                     help="keep the port's full tensors, beside the reference's, for the modules matching GLOB "
                          "(repeatable): every comparison made for them, written to kept/ in the report directory")
    run.add_argument("--stream-layers", action="store_true",
                     help="for models larger than memory: load one block at a time in each framework from "
                          "--checkpoint (memory-mapped safetensors; default: the registry's checkpoint for the "
                          "config) and align it on the reference's inputs "
                          "(fp32, teacher-forced; the model's [stream] table names its blocks)")
    run.add_argument("--fast", action="store_true",
                     help="the gate path: the teacher-forced verdict only (no free-running run, no observer runs)")
    run.add_argument("--weights-from", choices=["rules", "pretrained"], default="rules",
                     help="load the port's weights with align's rules (default), or with the port's own "
                          "from_pretrained, checked tensor by tensor against the rules")

    convert = sub.add_parser("convert", help="draft a port with PaConvert from the reference's own modeling file "
                                             "and make it runnable (writes build/converted/<model>/)")
    convert.add_argument("model")
    convert.add_argument("--port", default="converted", choices=["converted"], help=argparse.SUPPRESS)
    convert.add_argument("--paconvert", type=Path,
                         help="the paconvert executable (default: .venv-paconvert/bin/paconvert beside align.toml; "
                              "`make venv-paconvert` creates it)")

    trace = sub.add_parser("trace", help="run only the reference and save a trace for `align check`")
    trace.add_argument("model")
    trace.add_argument("--config", help="a config of the model (default: the model's default_config)")
    trace.add_argument("--checkpoint", type=Path, help="reference weights (safetensors) instead of seeded random ones")
    trace.add_argument("--out", type=Path, required=True, help="the trace directory to write")
    trace.add_argument("--force", action="store_true", help="replace an existing trace")
    trace.add_argument("--quiet", action="store_true", help="no progress display")

    check = sub.add_parser("check", help="run only the port against a saved trace; same report as `align run`")
    check.add_argument("model")
    check.add_argument("--trace", type=Path, required=True, help="a directory written by `align trace`")
    check.add_argument("--dtype", action="append", choices=sorted(DTYPE_ALIASES))
    check.add_argument("--out", type=Path, help="report directory (default: reports/<model>/ beside align.toml)")
    check.add_argument("--quiet", action="store_true", help="no progress display")
    check.add_argument("--as-command", help=argparse.SUPPRESS)  # the command the user typed, when delegated
    check.add_argument("--weights-from", choices=["rules", "pretrained"], default="rules")
    check.add_argument("--fast", action="store_true", help="the gate path (see `align run --fast`)")
    check.add_argument("--keep", action="append", default=[], metavar="GLOB", help="see `align run --keep`")
    check.add_argument("--only", action="append", default=[], metavar="GLOB", help="see `align run --only`")

    gate = sub.add_parser("gate", help="align every model marked ci = true; exit 1 if any is not aligned")
    gate.add_argument("--junit", type=Path, help="also write JUnit XML here (one test case per model, dtype and mode)")
    gate.add_argument("--reports", type=Path, help="reports directory (default: reports/ beside align.toml)")
    gate.add_argument("--quiet", action="store_true", help="no progress display")
    gate.add_argument("--full", action="store_true",
                      help="the full diagnostic path (free-running run and observer runs too); default: the gate path")

    weights = sub.add_parser("weights", help="convert and verify checkpoints with a model's weight rules")
    wsub = weights.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    for name, helptext in (("convert", "convert SRC into DST, shard by shard"),
                           ("verify", "prove DST is the exact image of SRC under the rules (exit 1 if not)")):
        w = wsub.add_parser(name, help=helptext)
        w.add_argument("src", type=Path, help="a .safetensors file or a directory with model.safetensors.index.json")
        w.add_argument("dst", type=Path)
        w.add_argument("--model", required=True, help="the align.toml model whose weight rules apply")
        w.add_argument("--to", choices=["paddle", "torch"], default="paddle",
                       help="direction: DST holds the port's tensors (paddle, default) or the reference's (torch)")
        w.add_argument("--config", help="model config (a table name or a config.json); default: SRC's config.json, else tiny")
        w.add_argument("--allow-pickle", action="store_true",
                       help="accept a trusted .bin/.pt/.pth/.pdparams SRC (torch pickles load with weights_only=True)")
        if name == "convert":
            w.add_argument("--dtype", choices=["bfloat16"], help="cast fp32 tensors (except the rules' keep_fp32)")
            w.add_argument("--force", action="store_true", help="replace DST if it exists")
            w.add_argument("--quiet", action="store_true", help="no progress bar")
    rules = wsub.add_parser("rules", help="write a rules file generated from the port's layer types")
    rules.add_argument("--model", required=True)
    rules.add_argument("--config", default="tiny")
    rules.add_argument("--out", type=Path, help="write here instead of stdout")

    report = sub.add_parser("report", help="work with written reports")
    report_sub = report.add_subparsers(dest="report_command", required=True, metavar="ACTION")
    render = report_sub.add_parser("render", help="re-render report.html (and JUnit) from a report.json alone")
    render.add_argument("path", type=Path, help="a report.json, or the directory holding it")
    render.add_argument("--junit", type=Path, help="also write JUnit XML here")
    return p


def _registry(args: argparse.Namespace) -> Registry:
    return load_registry(args.registry or find_registry())


def _progress(console: Console, name: str, quiet: bool):
    """A rich status line for long steps, as a context manager yielding progress(step)."""
    from contextlib import contextmanager

    @contextmanager
    def show():
        with console.status("aligning", spinner="dots") as status:
            yield (lambda step: None) if quiet else (lambda step: status.update(f"{name}: {step}"))

    return show()


def _align_and_write(spec: ModelSpec, out: Path, console: Console, quiet: bool, command: str,
                     config: str | None = None, dtypes: tuple[str, ...] | None = None,
                     checkpoint: Path | None = None, reference=None, weights_from: str = "rules",
                     only: tuple[str, ...] = (), fast: bool = False, shared: bool = False,
                     keep: tuple[str, ...] = ()) -> dict:
    """Align one model (against a saved `reference` run, if given) and write its report
    directory (see report.files.write_result). `fast`: the gate path. `shared`: the
    reference is used again afterwards, so its tensors are not released. `keep`: module
    globs whose tensors are kept in full (see compare.keep)."""
    from align.core import check_port, run_reference
    from align.report.console import render_console
    from align.report.files import write_result

    if spec.port_environment and reference is None:
        return _align_across(spec, out, console, quiet, command, config, dtypes, checkpoint, weights_from, only, fast,
                             keep)
    started = time.perf_counter()
    with _progress(console, spec.name, quiet) as progress:
        reference = reference or run_reference(spec, config, checkpoint, progress, only, observe=not fast)
        result = check_port(spec, reference, dtypes, progress, command, weights_from, fast=fast, release=not shared,
                            keep=keep)
    report, paths = write_result(result, out, keep, time.perf_counter() - started)
    render_console(report, console, paths)
    return report


def _align_across(spec: ModelSpec, out: Path, console: Console, quiet: bool, command: str,
                  config: str | None, dtypes: tuple[str, ...] | None, checkpoint: Path | None,
                  weights_from: str = "rules", only: tuple[str, ...] = (), fast: bool = False,
                  keep: tuple[str, ...] = ()) -> dict:
    """The reference here, the port in its own environment: trace, then `align check` there."""
    import tempfile

    from align.core.across import check_elsewhere, environment_python, trace_reference

    env_dir = environment_python(spec).parent.parent
    with tempfile.TemporaryDirectory(prefix="align-trace-") as tmp:
        with _progress(console, spec.name, quiet) as progress:
            run, trace = trace_reference(spec, Path(tmp) / spec.name, progress, config, checkpoint, only, fast)
        console.print(f"{spec.name}: reference traced here (torch {run.env['torch']}); "
                      f"checking the port in {env_dir.name}", highlight=False)
        return check_elsewhere(spec, trace, out, command, dtypes, weights_from, fast, keep, quiet)


def _port_names(spec: ModelSpec, asked: list[str] | None) -> list[str]:
    """The ports `--port` names, in order: hand first, then each generated variant."""
    known = (["hand"] if spec.port_class else []) + list(spec.ports)
    names = known if "all" in (asked or []) else list(dict.fromkeys(asked or known[:1]))
    for name in names:
        if name == "hand" and not spec.port_class:
            raise ConfigError(spec.source, f"models.{spec.name}.port",
                              f"{spec.name} has no hand port (known: {', '.join(known)})")
        if name != "hand" and name not in spec.ports:
            raise ConfigError(spec.source, f"models.{spec.name}.ports.{name}",
                              f"no such port for {spec.name} (known: {', '.join(known)})")
    return names


def _port_spec(spec: ModelSpec, port: str) -> ModelSpec:
    from align.convert.port import load_port

    return spec if port == "hand" else load_port(spec, spec.ports[port])


def _run(args: argparse.Namespace, argv: list[str], console: Console) -> ExitCode:
    registry = _registry(args)
    spec = registry.get(args.model)
    ports = _port_names(spec, args.port)
    specs = {port: _port_spec(spec, port) for port in ports}  # fails early if a port is not generated
    dtypes = tuple(dict.fromkeys(DTYPE_ALIASES[d] for d in args.dtype)) if args.dtype else None
    command = "align " + " ".join(shlex.quote(a) for a in argv)
    if args.stream_layers:
        return _run_streamed(specs[ports[0]], args, command, console)
    if len(ports) == 1:
        from align.report.files import report_dir

        out = args.out or report_dir(registry.source.parent / "reports", spec.name, ports[0])
        report = _align_and_write(specs[ports[0]], out, console, args.quiet, command, args.config, dtypes,
                                  args.checkpoint, weights_from=args.weights_from, only=tuple(args.only),
                                  fast=args.fast, keep=tuple(args.keep))
        return exit_code([report])
    return _run_side_by_side(spec, specs, args, dtypes, command, console)


def _run_streamed(spec: ModelSpec, args: argparse.Namespace, command: str, console: Console) -> ExitCode:
    from align.core.streamed import align_streamed
    from align.report.console import render_console
    from align.report.files import report_dir, write_result

    config = args.config or spec.default_config
    checkpoint = args.checkpoint or spec.checkpoint_for(config)  # as the in-process run loads it
    if checkpoint is None:
        raise ConfigError(spec.source, f"models.{spec.name}", "--stream-layers needs --checkpoint (the weights to stream)"
                          f" or a checkpoint for config {config!r} in [models.{spec.name}.checkpoints]")
    for flag, given in (("--dtype", args.dtype), ("--fast", args.fast),
                        ("--weights-from", args.weights_from != "rules"), ("--port", len(args.port or []) > 1)):
        if given:
            raise ConfigError(spec.source, f"models.{spec.name}", f"--stream-layers does not take {flag} yet")
    out = args.out or report_dir(spec.root / "reports", spec.name, "hand")
    started = time.perf_counter()
    with _progress(console, spec.name, args.quiet) as progress:
        result = align_streamed(spec, config, checkpoint, progress, command,
                                only=tuple(args.only), keep=tuple(args.keep))
    report, paths = write_result(result, out, tuple(args.keep), time.perf_counter() - started)
    render_console(report, console, paths)
    return exit_code([report])


def _run_side_by_side(spec: ModelSpec, specs: dict[str, ModelSpec], args: argparse.Namespace,
                      dtypes: tuple[str, ...] | None, command: str, console: Console) -> ExitCode:
    """Several ports against ONE reference run: each gets its own report directory, and a
    side-by-side page compares them module by module."""
    from align.atomic import write_atomic
    from align.core import run_reference
    from align.report import side_by_side
    from align.report.files import report_dir

    if any(s.port_environment for s in specs.values()):
        raise ConfigError(spec.source, f"models.{spec.name}.port.environment",
                          "ports in another environment cannot be aligned side by side yet")
    root = args.out or spec.root / "reports"
    with _progress(console, spec.name, args.quiet) as progress:
        reference = run_reference(spec, args.config, args.checkpoint, progress, tuple(args.only), observe=not args.fast)
    reports = {}
    for port, port_spec in specs.items():
        reports[port] = _align_and_write(port_spec, report_dir(root, spec.name, port), console, args.quiet,
                                         command, dtypes=dtypes, reference=reference, weights_from=args.weights_from,
                                         fast=args.fast, shared=True, keep=tuple(args.keep))
    path = root / f"{spec.name}-ports.html"
    write_atomic(path, side_by_side.render_html(reports))
    side_by_side.render_console(reports, console)
    console.print(f"wrote {path}", highlight=False)
    return exit_code(reports.values())


def _convert(args: argparse.Namespace, console: Console) -> ExitCode:
    from align.convert.port import convert, render

    spec = _registry(args).get(args.model)
    if args.port not in spec.ports:
        raise ConfigError(spec.source, f"models.{spec.name}.ports.{args.port}",
                          f"{spec.name} declares no {args.port} port; add [models.{spec.name}.ports.{args.port}]")
    if args.paconvert is not None and not args.paconvert.is_file():
        raise ConfigError(args.paconvert, "", "no such file (--paconvert)")
    report = convert(spec, spec.ports[args.port], args.paconvert)
    console.print(render(report), highlight=False, markup=False)
    return ExitCode.ALIGNED


def _trace(args: argparse.Namespace, console: Console) -> ExitCode:
    from align.core.across import trace_reference

    spec = _registry(args).get(args.model)
    with _progress(console, spec.name, args.quiet) as progress:
        run, path = trace_reference(spec, args.out, progress, args.config, args.checkpoint, force=args.force)
    console.print(f"traced {spec.name} ({run.config_name} config): {len(run.trace.calls)} module calls, "
                  f"torch {run.env['torch']}, transformers {run.env['transformers']} -> {path}")
    return ExitCode.ALIGNED


def _check(args: argparse.Namespace, argv: list[str], console: Console) -> ExitCode:
    from align.core.reference import fingerprint
    from align.core.trace_io import check_matches, read_trace
    from align.registry.spec import require_matching

    registry = _registry(args)
    spec = registry.get(args.model)
    run = read_trace(args.trace)
    check_matches(run, spec, fingerprint(spec, run.config_name), run.config_name)
    if args.only:  # narrows the report, as `align run --only` does; the trace holds every module
        require_matching(spec, "--only", tuple(args.only), (c.module for c in run.trace.calls.values()))
        run = dataclasses.replace(run, only=tuple(args.only))
    dtypes = tuple(dict.fromkeys(DTYPE_ALIASES[d] for d in args.dtype)) if args.dtype else None
    out = args.out or registry.source.parent / "reports" / spec.name
    command = args.as_command or "align " + " ".join(shlex.quote(a) for a in argv)
    report = _align_and_write(spec, out, console, args.quiet, command, dtypes=dtypes, reference=run,
                              weights_from=args.weights_from, fast=args.fast, keep=tuple(args.keep))
    return exit_code([report])


def _gate(args: argparse.Namespace, console: Console) -> ExitCode:
    from align.atomic import write_atomic
    from align.report.junit import render_junit

    registry = _registry(args)
    models = gated(registry)
    root = args.reports or registry.source.parent / "reports"
    reports = [_align_and_write(spec, root / spec.name, console, args.quiet,
                                f"align run {spec.name}" + ("" if args.full else " --fast"), fast=not args.full)
               for spec in models]
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
    return exit_code(reports)


def _render(args: argparse.Namespace, console: Console) -> ExitCode:
    from align.atomic import write_atomic
    from align.report.files import load_report
    from align.report.html import render_html
    from align.report.junit import render_junit

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
    return exit_code([report])


def _weights(args: argparse.Namespace, console: Console) -> ExitCode:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from align import builders
    from align.weights.checkpoint import (
        Checkpoint,
        convert_checkpoint,
        verify_checkpoint,
    )
    from align.weights import load_rules, plan, render_rules, same_bytes

    spec = _registry(args).get(args.model)
    rules = load_rules(spec.weights_file)
    if args.weights_command == "rules":
        cfg = builders.reference_config(spec, args.config)
        text = render_rules(builders.port_slots(spec, cfg),
                            f"Generated by `align weights rules --model {spec.name}` from {spec.port_class}.\n"
                            "Add renames, ties, merges and ignores by hand; see align/weights.py.")
        if args.out:
            from align.atomic import write_atomic

            write_atomic(args.out, text)
            console.print(f"wrote {args.out}")
        else:
            print(text, end="")
        return ExitCode.ALIGNED

    config = args.config or (str(args.src / "config.json") if (args.src / "config.json").is_file() else "tiny")
    cfg = builders.reference_config(spec, config)
    slots = builders.port_slots(spec, cfg)
    with Checkpoint(args.src, args.allow_pickle) as src:
        source_shapes = src.shapes() if args.to == "paddle" else builders.reference_shapes(spec, cfg)
        same = (lambda a, b: same_bytes(src.get(a), src.get(b))) if args.to == "paddle" else None
        strict = args.weights_command == "convert"
        wmap = plan(rules, source_shapes, slots, cfg.to_dict(), same=same, strict=strict)
        if args.weights_command == "convert":
            with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                          TimeRemainingColumn(), console=console, disable=args.quiet) as bar:
                task = bar.add_task(f"{args.src.name} -> {args.dst.name}", total=None)
                result = convert_checkpoint(
                    src, args.dst, wmap, args.to, cast={"bfloat16": "BF16"}.get(args.dtype),
                    keep_fp32=rules.stays_fp32, force=args.force,
                    on_progress=lambda done, total: bar.update(task, completed=done, total=total))
            if args.src.is_dir() and (args.src / "config.json").is_file() and args.dst.is_dir():
                shutil.copy2(args.src / "config.json", args.dst / "config.json")
            console.print(f"wrote {result.tensors} tensors, {result.bytes / 1e9:.3f} GB in {len(result.shards)} "
                          f"shard(s) to {result.destination} in {result.seconds:.2f} s ({result.gb_per_s:.2f} GB/s)")
            return ExitCode.ALIGNED
        with Checkpoint(args.dst) as dst:
            result = verify_checkpoint(src, dst, wmap, args.to,
                                       ignored=rules.ignored if args.to == "torch" else (lambda k: None))
    for label, items in (("source tensor maps to nothing", result.unmapped),
                         ("target tensor never written by the rules", result.unwritten),
                         ("expected in DST but missing", result.missing),
                         ("in DST but not written by the rules", result.extra),
                         ("not bit-exact", result.mismatched)):
        for item in items:
            console.print(f"[red]{label}[/]: {item}", highlight=False)
    state = "[green]exact image[/]" if result.ok else "[red]NOT the image[/]"
    console.print(f"{args.dst}: {state} of {args.src} under {rules.source.name} "
                  f"({result.matched}/{result.checked} tensors bit-exact)")
    return ExitCode.ALIGNED if result.ok else ExitCode.NOT_ALIGNED


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)  # long lines stay whole: CI logs get grepped
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
        if args.command == "weights":
            return _weights(args, console)
        if args.command == "convert":
            return _convert(args, console)
        if args.command == "trace":
            return _trace(args, console)
        if args.command == "check":
            return _check(args, argv, console)
        return _run(args, argv, console)
    except (ConfigError, WeightError) as e:
        print(f"align: error: {e}", file=sys.stderr)
        return ExitCode.USAGE_ERROR
    except KeyboardInterrupt:
        print("align: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
