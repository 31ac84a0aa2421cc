"""The commands that align models: run (in memory, streamed, or several ports side by side),
trace and check (across processes), gate, report render and convert. Each reads the
registry, hands the work to align.core, writes the report directory and returns an ExitCode."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from align.cli.parser import DTYPE_ALIASES
from align.cli.shell import judged_as_asked, progress_of, registry_of
from align.errors import ConfigError
from align.gate import ExitCode, exit_code, gated
from align.registry.spec import ModelSpec


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
    with progress_of(console, spec.name, quiet) as progress:
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
    from align.atomic import scratch
    from align.core.across import check_elsewhere, environment_python, port_modules_elsewhere, trace_reference

    env_dir = environment_python(spec).parent.parent
    with scratch("trace") as tmp:
        with progress_of(console, spec.name, quiet) as progress:
            # the float64 truth forces what the port forces; without a truth, nothing to ask
            modules = port_modules_elsewhere(spec, config, Path(tmp)) if spec.noise_floor else None
            run, trace = trace_reference(spec, Path(tmp) / spec.name, progress, config, checkpoint, only, fast,
                                         port_modules=modules)
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


def run(args: argparse.Namespace, argv: list[str], console: Console) -> ExitCode:
    registry = registry_of(args)
    spec = judged_as_asked(registry.get(args.model), args)
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
    with progress_of(console, spec.name, args.quiet) as progress:
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
    with progress_of(console, spec.name, args.quiet) as progress:
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


def convert(args: argparse.Namespace, console: Console) -> ExitCode:
    from align.convert.port import convert, render

    spec = registry_of(args).get(args.model)
    if args.port not in spec.ports:
        raise ConfigError(spec.source, f"models.{spec.name}.ports.{args.port}",
                          f"{spec.name} declares no {args.port} port; add [models.{spec.name}.ports.{args.port}]")
    if args.paconvert is not None and not args.paconvert.is_file():
        raise ConfigError(args.paconvert, "", "no such file (--paconvert)")
    report = convert(spec, spec.ports[args.port], args.paconvert)
    console.print(render(report), highlight=False, markup=False)
    return ExitCode.ALIGNED


def trace(args: argparse.Namespace, console: Console) -> ExitCode:
    from align.core.across import trace_reference

    spec = registry_of(args).get(args.model)
    modules = None if args.port_modules is None else _module_list(args.port_modules)
    with progress_of(console, spec.name, args.quiet) as progress:
        run, path = trace_reference(spec, args.out, progress, args.config, args.checkpoint, force=args.force,
                                    port_modules=modules)
    console.print(f"traced {spec.name} ({run.config_name} config): {len(run.trace.calls)} module calls, "
                  f"torch {run.env['torch']}, transformers {run.env['transformers']} -> {path}")
    return ExitCode.ALIGNED


def _module_list(path: Path) -> list[str]:
    from align.registry.spec import read_json

    modules = read_json(path, "no such file (--port-modules)")
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise ConfigError(path, "", "expected a JSON list of module paths, as `align port-modules` writes")
    return modules


def port_modules(args: argparse.Namespace) -> ExitCode:
    from align import builders
    from align.atomic import write_atomic
    from align.core.port import port_modules as module_paths
    from align.registry.spec import read_json

    spec = registry_of(args).get(args.model)
    values = read_json(args.values, "no such file (--values)")
    if not isinstance(values, dict):
        raise ConfigError(args.values, "", "expected a JSON object of the reference config's values")
    port = builders.port_skeleton(spec, values)
    write_atomic(args.out, json.dumps(sorted(module_paths(port))) + "\n")
    return ExitCode.ALIGNED


def check(args: argparse.Namespace, argv: list[str], console: Console) -> ExitCode:
    from align.core.reference import fingerprint
    from align.core.trace_io import check_matches, read_trace
    from align.registry.spec import require_matching

    registry = registry_of(args)
    spec = judged_as_asked(registry.get(args.model), args)
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


def gate(args: argparse.Namespace, console: Console) -> ExitCode:
    from align.atomic import write_atomic
    from align.report.junit import render_junit

    registry = registry_of(args)
    models = gated(registry)
    root = args.reports or registry.source.parent / "reports"
    reports = [_align_and_write(judged_as_asked(spec, args), root / spec.name, console, args.quiet,
                                f"align run {spec.name}" + ("" if args.full else " --fast")
                                + (" --strict" if args.strict else ""), fast=not args.full)
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


def check_report(path: Path, report: object) -> None:
    """A report.json this align can render: its schema, and every top-level key it holds."""
    from align.report.schema import SCHEMA_VERSION, TOP_LEVEL_KEYS

    if not isinstance(report, dict) or "schema_version" not in report:
        raise ConfigError(path, "schema_version", "missing: not a report.json written by align")
    if report["schema_version"] != SCHEMA_VERSION:
        raise ConfigError(path, "schema_version", f"{report['schema_version']!r}, written by another version of align "
                                                  f"(this one reads {SCHEMA_VERSION}): run the model again")
    missing = [k for k in TOP_LEVEL_KEYS if k not in report]
    if missing:
        raise ConfigError(path, missing[0], f"missing: the report is incomplete ({len(missing)} key(s) missing)")


def render(args: argparse.Namespace, console: Console) -> ExitCode:
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
    check_report(path, report)
    html_path = path.parent / "report.html"
    write_atomic(html_path, render_html(report))
    console.print(f"wrote {html_path}")
    if args.junit:
        write_atomic(args.junit, render_junit([report]))
        console.print(f"wrote {args.junit}")
    return exit_code([report])

