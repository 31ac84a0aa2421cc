"""report.json is the only truth; the console summary and the HTML are rendered from it.

Files are written to a temporary name in the same directory and renamed into place, so a
crash never leaves a half-written report that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from align.compare import mismatch_message
from align.metrics import Metrics
from align.spec import Tolerance


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a report is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_folder(out_dir: Path, fill: Callable[[Path], None]) -> Path:
    """Write the folder `out_dir` whole or not at all: `fill` writes its files into a fresh
    temporary folder beside it, which then replaces `out_dir` (and whatever it held)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write report.json and report.html into out_dir; returns both paths."""
    from align.html import render_html

    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    write_atomic(json_path, dumps(report))
    write_atomic(html_path, render_html(report))
    return json_path, html_path


HISTORY = "history.jsonl"


def append_history(report: dict, reports_root: Path, entry: str | None = None) -> None:
    """One line per run in reports/history.jsonl, so the dashboard can show a regression.
    `entry` is the report's directory under reports_root (reports/<model>-converted/ for a
    generated port): the dashboard keeps one row per entry, so two ports never share one."""
    from align.html import worst_teacher_forced

    line = {
        "model": report["model"], "entry": entry or report["model"], "created": report["created"],
        "verdict": report["verdict"],
        "config": report["config"], "port": report["port"],
        "worst_teacher_forced": worst_teacher_forced(report),
        "dtypes": {r["dtype"]: (r["status"] if r["status"] != "ran" else ("pass" if r["passed"] else "fail"))
                   for r in report["runs"] if r["mode"] == "teacher_forced"},
        "first_divergence": report["first_divergence"],
    }
    reports_root.mkdir(parents=True, exist_ok=True)
    with open(reports_root / HISTORY, "a", encoding="utf-8") as f:
        f.write(json.dumps(_encode(line)) + "\n")


def read_history(reports_root: Path) -> list[dict]:
    path = reports_root / HISTORY
    if not path.is_file():
        return []
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        try:
            lines.append(_decode(json.loads(raw)))
        except json.JSONDecodeError:
            continue  # a line cut by a crash mid-append; the rest of the history still counts
    return lines


def write_index(reports_root: Path) -> Path:
    """reports/index.html from every reports/<model>/report.json and the history."""
    from align.html import render_index

    latest = {}
    for path in sorted(reports_root.glob("*/report.json")):
        try:
            report = load_report(path)
        except (OSError, ValueError):
            continue  # unreadable: not one of ours, or cut short; the dashboard shows the rest
        if isinstance(report, dict) and "schema_version" in report and "model" in report:
            latest[path.parent.name] = report  # the directory: one row per model and port
    out = reports_root / "index.html"
    write_atomic(out, render_index(latest, read_history(reports_root)))
    return out


# Options of `align run` and `align check` that choose what is aligned (kept in a rerun), and
# those that do not.
_RERUN_KEEPS = {"--registry", "--config", "--checkpoint", "--weights-from", "--trace"}
_RERUN_DROPS = {"--only", "--dtype", "--port", "--keep", "--out"}


def rerun_command(report: dict, dtype: str, module: str, variant: str | None) -> str:
    """The command that reruns just `module`: the report's own `align run` or `align check`
    command (its registry, config, checkpoint, trace, loader and streaming kept) narrowed to
    it, or `align run MODEL ...` when the report came from another command (the gate)."""
    import shlex

    try:
        words = shlex.split(report.get("command") or "")
    except ValueError:
        words = []
    if words[:1] != ["align"] or not {"run", "check"} & set(words):
        words = ["align", "run", report["model"]]
    if "run" not in words:
        variant = None  # `align check` aligns the port the registry names: it has no --port
    kept, skip = [], False
    for w in words:
        name = w.split("=", 1)[0]
        if skip:
            skip = False
        elif name in _RERUN_DROPS:
            skip = "=" not in w  # its value is the next word
        elif name.startswith("-") and name not in _RERUN_KEEPS and name != "--stream-layers":
            pass  # --quiet, --fast: how, not what
        else:
            kept.append(w)
    kept += ["--port", variant] if variant else []
    kept += [] if "--stream-layers" in kept else ["--dtype", dtype]  # the streamed path runs fp32 only
    return " ".join(shlex.quote(w) for w in [*kept, "--only", module])


def _layer_message(report: dict, report_run: dict, name: str, direction: str) -> str:
    layer = next(layer for layer in report_run["layers"] if layer["name"] == name)
    m = Metrics(**layer[direction])
    module = name.split("#")[0]
    from align.convert import port_variant_of

    rerun = rerun_command(report, report_run["dtype"], module, port_variant_of(report["port"])) \
        if module != "<root>" else ""
    return mismatch_message(name, direction, m, Tolerance(**layer["tolerance"]), report_run["dtype"],
                            report_run["mode"], rerun)


def failure_messages(report: dict) -> list[str]:
    """Mismatch messages for each gated run's first divergences, outputs and parameter grads."""
    messages = []
    for run in report["runs"]:
        if run["status"] != "ran" or not run["gated"]:
            continue
        for direction in ("forward", "backward"):
            name = run["first_divergence"][direction]
            if name is not None:
                messages.append(_layer_message(report, run, name, direction))
    for kind, items in (("model output", report["outputs"]), ("parameter gradient", report["param_grads"])):
        bad = [i for i in items if not i["passed"]]
        for item in bad[:3]:
            m = Metrics(**{k: v for k, v in item.items() if k not in ("name", "tolerance")})
            messages.append(mismatch_message(f"{kind} {item['name']}", "forward" if kind == "model output" else "backward",
                                             m, Tolerance(**item["tolerance"]), "float32", "free_running"))
        if len(bad) > 3:
            messages.append(f"... and {len(bad) - 3} more failing {kind}s")
    return messages


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def _worst(layers: list[dict], direction: str) -> float | None:
    values = [layer[direction]["max_abs"] for layer in layers if layer[direction] is not None]
    return max(values) if values else None


def render_console(report: dict, console: Console, paths: tuple[Path, ...] = ()) -> None:
    verdict = report["verdict"]
    style = {"pass": "bold green", "fail": "bold red"}.get(verdict, "bold yellow")
    loader = " loaded by its own from_pretrained" if report.get("weights_from") == "pretrained" else ""
    console.print(f"[bold]{report['model']}[/] ({report['config']} config, {report['port']}{loader}): "
                  f"[{style}]{verdict.upper()}[/]")
    table = Table(show_edge=False, pad_edge=False)
    for col in ("dtype", "mode", "gate", "result", "layers", "worst fwd", "worst bwd", "first divergence"):
        table.add_column(col, no_wrap=col != "first divergence")
    for run in report["runs"]:
        mode = run["mode"].replace("_", "-")
        if run["status"] != "ran":
            table.add_row(run["dtype"], mode, "yes" if run["gated"] else "info", "[yellow]NOT RUN[/]",
                          "-", "-", "-", "(see warnings)")
            continue
        layers = run["layers"]
        ok = sum(layer["passed"] for layer in layers)
        fd = run["first_divergence"]
        where = " / ".join(f"{d}: {fd[d]}" for d in ("forward", "backward") if fd[d]) or "-"
        result = "[green]pass[/]" if run["passed"] else "[red]FAIL[/]"
        table.add_row(run["dtype"], mode, "yes" if run["gated"] else "info", result, f"{ok}/{len(layers)}",
                      _fmt(_worst(layers, "forward")), _fmt(_worst(layers, "backward")), where)
    console.print(table)
    if report.get("only"):
        console.print(f"[yellow]partial[/]: the report is limited to --only {' '.join(report['only'])}")
    if report.get("shell_judged") is False:
        console.print("[yellow]partial[/]: streamed, --only chose no module of the shell, which was not run: "
                      "no model outputs, and only the chosen blocks' parameter gradients")
    gate_path = report.get("path") == "gate"
    if gate_path:
        console.print("gate path: teacher-forced only; outputs and parameter gradients as the forced pass saw them")
    elif report.get("path") == "stream":
        console.print("layer-streamed: one block at a time from the checkpoint, teacher-forced only (fp32); "
                      "outputs and parameter gradients as the forced passes saw them")
    for kind, items in (("outputs", report["outputs"]), ("param grads", report["param_grads"])):
        if items:
            worst = max(items, key=lambda i: i["max_abs"])
            bad = sum(not i["passed"] for i in items)
            state = "[green]pass[/]" if not bad else f"[red]{bad} FAIL[/]"
            console.print(f"{kind}: {state}, {len(items)} compared, worst {worst['name']} max abs {_fmt(worst['max_abs'])}")
    gated = next((r for r in report["runs"] if r["status"] == "ran" and r["gated"]), None)
    if gated:
        worst_layers = sorted(gated["layers"], key=lambda layer: -max(
            layer["forward"]["needed_atol"], (layer["backward"] or {"needed_atol": 0.0})["needed_atol"]))[:5]
        console.print("worst teacher-forced layers (smallest passing atol): " + ", ".join(
            f"{layer['name']} {_fmt(max(layer['forward']['needed_atol'], (layer['backward'] or {'needed_atol': 0})['needed_atol']))}"
            for layer in worst_layers))
    c = report.get("culprits") or {}
    for direction in ("forward", "backward"):
        if c.get(direction):
            console.print(f"[bold red]culprit[/] ({direction}, {c['mode'].replace('_', '-')}): "
                          + ", ".join(c[direction]))
    for run in report["runs"]:
        if run["status"] == "ran" and run.get("amplifying"):
            console.print(f"[yellow]amplifies error[/] ({run['dtype']}, {run['mode'].replace('_', '-')}): "
                          + ", ".join(run["amplifying"][:8]))
    for f in report.get("findings", []):
        if f["fails"]:
            console.print(f"[red]finding[/] {f['kind']}: {f['message']}")
    for o in report.get("observer", []):
        state = o.get("state", "identical" if o["outputs_identical"] and o["grads_identical"] else "DIFFERENT")
        state = "[red]DIFFERENT[/]" if state == "DIFFERENT" else state
        where = " (the run without hooks on a copy, alongside the others)" if o.get("alongside") else ""
        console.print(f"observer check ({o['framework']}): outputs and grads with hooks vs without: {state}{where}")
    if report.get("repro"):
        console.print(f"repro of the first culprit: {report['repro']}/repro.py")
    if report.get("kept"):
        k = report["kept"]
        console.print(f"kept {k['tensors']} port tensors, each beside the reference's, for --keep "
                      f"{' '.join(k['globs'])}: {k['path']}/index.json", highlight=False, markup=False)
    for u in report["unpaired"]:
        tag = "[dim]unpaired by design[/]" if u.get("allowed") else "[red]unpaired[/]"
        console.print(f"{tag} {u['side']} module {u['name']}: {u['reason']}")
    for w in report["warnings"]:
        console.print(f"[yellow]warning[/] {w}")
    for msg in failure_messages(report):
        console.print(msg, markup=False, highlight=False)
    for p in paths:
        console.print(f"wrote {p}")


# Metric fields that may be infinite (a missing tensor) or NaN. Strict JSON has no such
# numbers, so they are written as the strings "inf", "-inf" and "nan" and read back.
_FLOAT_FIELDS = frozenset({"max_abs", "mean_abs", "max_rel", "cosine", "needed_atol"})


def _encode(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return "nan"
    if isinstance(obj, float) and obj in (float("inf"), float("-inf")):
        return "inf" if obj > 0 else "-inf"
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: float(v) if k in _FLOAT_FIELDS and isinstance(v, str) else _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def dumps(report: dict) -> str:
    return json.dumps(_encode(report), indent=1, allow_nan=False) + "\n"


def as_json(report: dict) -> dict:
    """The report exactly as report.json will hold it (tuples become lists, and so on), so
    that everything rendered at run time equals what a later re-render from the file gives."""
    return _decode(json.loads(dumps(report)))


def load_report(path: Path) -> dict[str, Any]:
    return _decode(json.loads(Path(path).read_text()))
