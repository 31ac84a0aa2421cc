"""Two (or more) ports of one reference, side by side: `align run MODEL --port hand --port converted`.

Each port's report.json is the truth (written to its own directory by the usual path); this
module only reads them, pairs their rows by reference module name, and renders the result.
Nothing is recomputed.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from align.report.files import report_dir

MODES = ("teacher_forced", "free_running")


@dataclass(frozen=True)
class Cell:
    """One port's errors for one module in one mode (None: the port has no such row)."""

    forward: float | None
    backward: float | None
    passed: bool | None


@dataclass(frozen=True)
class Row:
    module: str
    cells: dict[str, Cell]  # port -> its cell


def _num(x) -> float | None:
    return None if x is None else float(x)  # report.json writes inf/nan as strings; float() reads them


def _fp32_run(report: dict, mode: str) -> dict | None:
    return next((r for r in report["runs"] if r["dtype"] == "float32" and r["mode"] == mode
                 and r["status"] == "ran"), None)


def rows(reports: dict[str, dict], mode: str = "teacher_forced") -> list[Row]:
    """Per reference module, each port's fp32 max abs error forward and backward, in the
    first report's (forward) order; modules only some ports have come last."""
    order: list[str] = []
    by_port: dict[str, dict[str, dict]] = {}
    for port, report in reports.items():
        run = _fp32_run(report, mode)
        layers = {layer["name"]: layer for layer in (run["layers"] if run else [])}
        by_port[port] = layers
        order += [n for n in layers if n not in order]
    out = []
    for name in order:
        cells = {}
        for port, layers in by_port.items():
            layer = layers.get(name)
            if layer is None:
                cells[port] = Cell(None, None, None)
                continue
            fwd, bwd = layer["forward"], layer["backward"]
            cells[port] = Cell(_num(fwd["max_abs"]) if fwd else None, _num(bwd["max_abs"]) if bwd else None,
                               bool(layer["passed"]))
        out.append(Row(name, cells))
    return out


def summary(report: dict) -> dict:
    """A port's headline numbers: verdict, worst fp32 errors per mode and direction, outputs."""
    out = {"verdict": report["verdict"], "port": report["port"]}
    for mode in MODES:
        run = _fp32_run(report, mode)
        for direction in ("forward", "backward"):
            values = [_num(layer[direction]["max_abs"]) for layer in (run["layers"] if run else [])
                      if layer[direction] is not None]
            out[f"{mode}.{direction}"] = max(values) if values else None
        out[f"{mode}.passed"] = None if run is None else sum(1 for layer in run["layers"] if layer["passed"])
        out[f"{mode}.layers"] = None if run is None else len(run["layers"])
    for kind in ("outputs", "param_grads"):
        values = [_num(t["max_abs"]) for t in report[kind] if t.get("max_abs") is not None]
        out[kind] = max(values) if values else None
    return out


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def render_console(reports: dict[str, dict], console: Console) -> None:
    ports = list(reports)
    head = Table(title=f"{next(iter(reports.values()))['model']}: {len(ports)} ports against one reference (fp32)",
                 show_edge=False)
    for col in ("port", "verdict", "tf layers", "tf worst fwd", "tf worst bwd", "free worst fwd", "free worst bwd",
                "outputs", "param grads"):
        head.add_column(col)
    for port, report in reports.items():
        s = summary(report)
        head.add_row(port, s["verdict"], f"{s['teacher_forced.passed']}/{s['teacher_forced.layers']}",
                     _f(s["teacher_forced.forward"]), _f(s["teacher_forced.backward"]),
                     _f(s["free_running.forward"]), _f(s["free_running.backward"]), _f(s["outputs"]),
                     _f(s["param_grads"]))
    console.print(head)
    table = Table(title="per module, teacher-forced max abs (forward / backward)", show_edge=False)
    table.add_column("module")
    for port in ports:
        table.add_column(port)
    for row in rows(reports):
        table.add_row(row.module, *(
            "missing" if c.passed is None else f"{_f(c.forward)} / {_f(c.backward)}" + ("" if c.passed else " FAIL")
            for c in (row.cells[p] for p in ports)))
    console.print(table)


def render_html(reports: dict[str, dict]) -> str:
    """One self-contained page: each port's headline, then every module's errors per port."""
    from align.report.html import CSS

    esc = html.escape
    ports = list(reports)
    model = next(iter(reports.values()))["model"]
    heads = "".join(f"<th>{esc(c)}</th>" for c in ("port", "class", "verdict", "teacher-forced layers",
                                                   "tf worst fwd", "tf worst bwd", "free worst fwd",
                                                   "free worst bwd", "outputs", "param grads"))
    body = []
    for port, report in reports.items():
        s = summary(report)
        body.append(
            f'<tr class="{"ok" if s["verdict"] == "pass" else "bad"}"><td><a href="{esc(report_dir(Path(), model, port).as_posix())}/report.html">'
            f"{esc(port)}</a></td><td><code>{esc(s['port'])}</code></td><td>{esc(s['verdict'])}</td>"
            f"<td>{s['teacher_forced.passed']}/{s['teacher_forced.layers']}</td>"
            + "".join(f"<td class=num>{_f(s[k])}</td>" for k in ("teacher_forced.forward", "teacher_forced.backward",
                                                                "free_running.forward", "free_running.backward",
                                                                "outputs", "param_grads")) + "</tr>")
    mod_heads = "<th>module</th>" + "".join(f"<th>{esc(p)} fwd</th><th>{esc(p)} bwd</th>" for p in ports)
    mod_rows = []
    for row in rows(reports):
        cells = []
        for p in ports:
            c = row.cells[p]
            cls = "na" if c.passed is None else ("ok" if c.passed else "bad")
            cells.append(f'<td class="num {cls}">{_f(c.forward)}</td><td class="num {cls}">{_f(c.backward)}</td>')
        mod_rows.append(f"<tr><td><code>{esc(row.module)}</code></td>{''.join(cells)}</tr>")
    verdict = "pass" if all(r["verdict"] == "pass" for r in reports.values()) else "fail"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(model)}: ports side by side</title>
<style>{CSS} td.ok{{background:#e8f5ec}} td.bad{{background:#fde8e8}} td.na{{color:#888}}</style></head><body>
<header class="verdict {verdict}"><h1>{esc(model)}: {len(ports)} ports, one reference</h1>
<div class="meta">fp32; every number is a max abs error against the same reference run; from each port's report.json</div>
</header><main>
<h2>Ports</h2><table><tr>{heads}</tr>{''.join(body)}</table>
<h2>Per module (teacher-forced: each module on the reference's own inputs)</h2>
<table><tr>{mod_heads}</tr>{''.join(mod_rows)}</table>
</main></body></html>
"""
