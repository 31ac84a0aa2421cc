"""The console summary of one report, rendered from report.json's dict alone."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from align.report.messages import failure_messages, judged_line


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def _worst(layers: list[dict], direction: str) -> float | None:
    values = [layer[direction]["max_abs"] for layer in layers if layer[direction] is not None]
    return max(values) if values else None


def _needed(layer: dict) -> float:
    return max(layer["forward"]["needed_atol"], (layer["backward"] or {"needed_atol": 0.0})["needed_atol"])


def _used(needed: float, tol: dict) -> float:
    """How much of its literal allowance a comparison needs (above 1: beyond it)."""
    return needed / tol["atol"] if tol["atol"] else (0.0 if needed == 0 else float("inf"))


def _by(item: dict) -> str:
    return ", passed by the float64 truth" if item.get("rule") == "floor" else ""


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
    if (line := judged_line(report)) is not None:
        console.print(line, markup=False, highlight=False)
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
    for kind, items in (("outputs", report["outputs"]), ("param grads", report["param_grads"]),
                        ("input grads", report.get("input_grads", []))):
        if items:
            bad = [i for i in items if not i["passed"]]
            if bad:
                worst = max(bad, key=lambda i: i["needed_atol"])
                console.print(f"{kind}: [red]{len(bad)} FAIL[/] of {len(items)}, worst failing {worst['name']} "
                              f"max abs {_fmt(worst['max_abs'])} (allowed {worst['tolerance']['atol']:g})")
            else:
                close = max(items, key=lambda i: _used(i["needed_atol"], i["tolerance"]))
                console.print(f"{kind}: [green]pass[/], {len(items)} compared; least headroom {close['name']} "
                              f"{_fmt(close['needed_atol'])} of {close['tolerance']['atol']:g}{_by(close)}")
    gated = next((r for r in report["runs"] if r["status"] == "ran" and r["gated"]), None)
    if gated:
        bad = [layer for layer in gated["layers"] if not layer["passed"]]
        if bad:
            console.print("failing teacher-forced layers (smallest passing atol): " + ", ".join(
                f"{layer['name']} {_fmt(_needed(layer))}" for layer in sorted(bad, key=lambda x: -_needed(x))[:5]))
        else:
            close = sorted(gated["layers"], key=lambda x: -_used(_needed(x), x["tolerance"]))[:5]
            console.print("headroom, the teacher-forced layers closest to their allowance (smallest passing atol): "
                          + ", ".join(f"{layer['name']} {_fmt(_needed(layer))}"
                                      f"{' (float64)' if _by(layer['forward']) or _by(layer['backward'] or {}) else ''}"
                                      for layer in close))
    c = report.get("culprits") or {}
    for direction in ("forward", "backward"):
        if c.get(direction):
            console.print(f"[bold red]culprit[/] ({direction}, {c['mode'].replace('_', '-')}): " + ", ".join(
                name + (f" (did not call {', '.join(c['uncalled'][name])})" if name in c.get("uncalled", {}) else "")
                for name in c[direction]))
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
    if report["verdict"] != "pass":
        for problem in report.get("problems", []):
            console.print(f"[red]not aligned[/]: {problem}", markup=True, highlight=False)
    for msg in failure_messages(report):
        console.print(msg, markup=False, highlight=False)
    for p in paths:
        console.print(f"wrote {p}")
