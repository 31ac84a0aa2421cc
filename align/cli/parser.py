"""The `align` command line: every command, option and help text."""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPE_ALIASES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}


class UsageError(Exception):
    """A command line argparse refused: one line, with where help is."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what was wrong, and how to get help) raised
    for the CLI's one error path, not a usage block printed and SystemExit."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="align", description="Prove a Paddle port computes what its torch reference computes.")
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
    run.add_argument("--strict", action="store_true",
                     help="judge fp32 by the literal tolerance alone (atol and rtol), with the float64 truth's numbers "
                          "reported but not deciding (default: the registry's [tolerance] strict)")
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
    trace.add_argument("--port-modules", type=Path, metavar="JSON",
                       help="the port's module paths (written by `align port-modules`): the float64 truth then "
                            "forces only the reference calls that port pairs with, as its forced pass does")
    trace.add_argument("--quiet", action="store_true", help="no progress display")

    modules = sub.add_parser("port-modules", help="write the port's module paths (JSON), for `align trace "
                                                  "--port-modules` in the reference's environment")
    modules.add_argument("model")
    modules.add_argument("--values", type=Path, required=True, metavar="JSON",
                         help="the reference config's values the port is built from")
    modules.add_argument("--out", type=Path, required=True, help="the JSON file to write")

    check = sub.add_parser("check", help="run only the port against a saved trace; same report as `align run`")
    check.add_argument("model")
    check.add_argument("--trace", type=Path, required=True, help="a directory written by `align trace`")
    check.add_argument("--dtype", action="append", choices=sorted(DTYPE_ALIASES))
    check.add_argument("--out", type=Path, help="report directory (default: reports/<model>/ beside align.toml)")
    check.add_argument("--quiet", action="store_true", help="no progress display")
    check.add_argument("--as-command", help=argparse.SUPPRESS)  # the command the user typed, when delegated
    check.add_argument("--weights-from", choices=["rules", "pretrained"], default="rules")
    check.add_argument("--fast", action="store_true", help="the gate path (see `align run --fast`)")
    check.add_argument("--strict", action="store_true", help="see `align run --strict`")
    check.add_argument("--keep", action="append", default=[], metavar="GLOB", help="see `align run --keep`")
    check.add_argument("--only", action="append", default=[], metavar="GLOB", help="see `align run --only`")

    gate = sub.add_parser("gate", help="align every model marked ci = true; exit 1 if any is not aligned")
    gate.add_argument("--junit", type=Path, help="also write JUnit XML here (one test case per model, dtype and mode)")
    gate.add_argument("--reports", type=Path, help="reports directory (default: reports/ beside align.toml)")
    gate.add_argument("--quiet", action="store_true", help="no progress display")
    gate.add_argument("--strict", action="store_true", help="see `align run --strict`")
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
                       help="accept a .bin/.pt/.pth/.pdparams/.pdopt SRC, read as tensors and plain data only: "
                            "a pickle asking for anything else (code) is refused")
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
