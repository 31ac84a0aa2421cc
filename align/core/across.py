"""Across processes: the reference traced in this process, the port checked in another, with
its own Python environment (a port whose framework pins clash with the reference's, such as
PaddleFormers'). The trace on disk (trace_io.py) is all the two processes share."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Collection
from pathlib import Path
from typing import Any

from align.core.judged import Progress
from align.core.reference import ReferenceRun, run_reference
from align.core.trace_io import TraceWriter
from align.errors import ConfigError
from align.registry.spec import ModelSpec
from align.report.files import load_report

USAGE_ERROR = 2  # what `align check` exits with on a user's mistake (cli.ExitCode)


def _how_to_create(env_dir: Path) -> str:
    """The Makefile's target for one of the repository's environments (.venv-NAME)."""
    if env_dir.name.startswith(".venv-"):
        return f"create it with `make {env_dir.name[1:]}`"
    return "create that environment with the port's packages and align installed"


def environment_python(spec: ModelSpec) -> Path:
    """The Python of the environment the registry says the port runs in."""
    env_dir = (spec.source.parent / spec.port_environment).resolve()
    python = env_dir / "bin" / "python"
    if not python.is_file():
        raise ConfigError(spec.source, f"models.{spec.name}.port.environment",
                          f"{env_dir} does not exist; {_how_to_create(env_dir)}")
    return python


def trace_reference(spec: ModelSpec, dst: Path, progress: Progress, config: str | None = None,
                    checkpoint: Path | None = None, only: tuple[str, ...] = (), fast: bool = False,
                    force: bool = False, port_modules: Collection[str] | None = None) -> tuple[ReferenceRun, Path]:
    """Run the reference and write its trace to `dst`, whole or not at all (`align trace`);
    its float64 truth forces what a port with `port_modules` forces (see forced_truth)."""
    with TraceWriter(dst, force) as writer:
        run = run_reference(spec, config, checkpoint, progress, only, sink=writer, observe=not fast,
                            port_modules=port_modules)
        return run, writer.finish(run)


def port_modules_elsewhere(spec: ModelSpec, config: str | None, tmp: Path) -> list[str]:
    """The port's module paths, from its own environment (`align port-modules`), built from the
    reference config's values: what the trace's float64 truth is to force."""
    from align import builders

    values = builders.values_of(builders.reference_config(spec, config or spec.default_config))
    (tmp / "values.json").write_text(json.dumps(values, default=str))
    cmd = [str(environment_python(spec)), "-m", "align", "--registry", str(spec.source), "port-modules", spec.name,
           "--values", str(tmp / "values.json"), "--out", str(tmp / "modules.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
        raise ConfigError(spec.source, f"models.{spec.name}.port", f"`align port-modules` in {spec.port_environment} "
                          f"failed (exit code {proc.returncode}): {last}")
    return json.loads((tmp / "modules.json").read_text())


def check_elsewhere(spec: ModelSpec, trace: Path, out: Path, command: str, dtypes: tuple[str, ...] | None = None,
                    weights_from: str = "rules", fast: bool = False, keep: tuple[str, ...] = (),
                    quiet: bool = False) -> dict[str, Any]:
    """`align check` of `trace` with the port environment's Python; the report it wrote to `out`."""
    cmd = [str(environment_python(spec)), "-m", "align", "--registry", str(spec.source), "check", spec.name,
           "--trace", str(trace.resolve()), "--out", str(out.resolve()), "--as-command", command,
           "--weights-from", weights_from]
    cmd += [a for d in dtypes or () for a in ("--dtype", d)] + (["--quiet"] if quiet else [])
    cmd += ["--fast"] if fast else []
    cmd += ["--strict"] if spec.noise_floor and spec.noise_floor.strict else []
    cmd += [a for g in keep for a in ("--keep", g)]
    # in the trace's own directory: a port's package may write beside the current directory
    # (PaddleSpeech's logger makes exp/log/ there), and that is not the user's
    proc = subprocess.run(cmd, cwd=trace.resolve().parent)
    if proc.returncode == USAGE_ERROR or not (out / "report.json").is_file():
        raise ConfigError(spec.source, f"models.{spec.name}.port", f"`align check` in {spec.port_environment} "
                          f"failed (exit code {proc.returncode}); see above")
    return load_report(out / "report.json")
