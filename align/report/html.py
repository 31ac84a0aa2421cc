"""HTML renderings of report.json: one model's page and the dashboard across models.

Each is one self-contained file: inline CSS and inline SVG, no scripts from anywhere, no
network. The layer tree collapses with plain <details> elements. Every string that comes
from a model or a report (module names, keys, messages) goes through `esc`.
"""

from __future__ import annotations

import html
import json
import math
import zlib
from typing import Any

from align.report.messages import failure_messages, judged_line

esc = html.escape

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1b1f24;background:#fff}
main{max-width:1280px;margin:0 auto;padding:0 20px 40px}
header.verdict{padding:16px 20px;color:#fff}
header.pass{background:#1f7a3a} header.fail{background:#b3261e} header.error{background:#8a6100}
header h1{margin:0 0 4px;font-size:22px} header a{color:#fff}
.meta{opacity:.9} code,pre{font-family:ui-monospace,monospace;font-size:12.5px}
pre{background:#f6f8fa;border:1px solid #d0d7de;padding:8px;overflow-x:auto}
table{border-collapse:collapse;margin:8px 0} th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;font-size:13px}
th{background:#f6f8fa} td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{background:#e9f7ee} .bad{background:#fde7e6} .na{background:#f3f3f3;color:#666}
h2{margin-top:28px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.badge{display:inline-block;padding:0 6px;border-radius:8px;font-size:11px;color:#fff;margin-left:6px}
.b-fd{background:#b3261e} .b-culprit{background:#6f42c1} .b-amp{background:#bf8700}
.tree .row{display:grid;grid-template-columns:minmax(380px,3fr) 1.1fr repeat(9,.72fr) .5fr;gap:0;
 border-bottom:1px solid #eee;font-size:12.5px;align-items:center}
.tree .row>span{padding:2px 6px;font-variant-numeric:tabular-nums;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.tree .head{font-weight:600;background:#f6f8fa;position:sticky;top:0}
.tree .head>span{white-space:normal} .tree .name{overflow:visible}
.tree details>summary{list-style:none;cursor:pointer} .tree details>summary::-webkit-details-marker{display:none}
.tree details>summary .name::before{content:"\\25B8 ";color:#888} .tree details[open]>summary .name::before{content:"\\25BE "}
.tree .leaf .name::before{content:"\\2022 ";color:#bbb}
.tree .fail{background:#fde7e6} .tree .pass{background:#fff} .tree .mark{outline:2px solid #b3261e}
.chart text{font-size:11px;fill:#444} .legend span{margin-right:14px}
"""

# Series drawn on the error-versus-depth chart: (run mode, direction, colour, dash).
SERIES = (("teacher_forced", "forward", "#0969da", ""), ("teacher_forced", "backward", "#cf222e", ""),
          ("free_running", "forward", "#0969da", "4 3"), ("free_running", "backward", "#cf222e", "4 3"))
FLOOR = 1e-12  # exact agreement is drawn here on the log scale


def _f(x: Any) -> str:
    if x is None:
        return "-"
    x = float(x)
    return "inf" if math.isinf(x) else ("nan" if math.isnan(x) else f"{x:.2e}")


def _cos(m: dict | None) -> str:
    return "-" if m is None else f"{float(m['cosine']):.6f}"


def _headroom(layer: dict) -> float:
    b = layer["backward"]
    return max(float(layer["forward"]["needed_atol"]), float(b["needed_atol"]) if b else 0.0)


def _state(passed: bool, *metrics: dict | None) -> str:
    """pass or FAIL, and whether the float64 truth let it pass (the literal rule alone would not)."""
    if not passed:
        return "FAIL"
    return "pass (float64)" if any(m and m.get("rule") == "floor" for m in metrics) else "pass"


def _judged(m: dict) -> str:
    """The rule that decided one comparison, with the truth's numbers where it was consulted."""
    if m.get("truth_error") is None:
        return "literal"
    return (f"{'float64 truth' if m['rule'] == 'floor' else m['rule']}: port {_f(m['truth_error'])} vs "
            f"reference {_f(m['reference_error'])} RMS from float64")


def _anchor(name: str) -> str:
    """A stable, safe element id for a module name."""
    return "m-" + "".join(c if c.isalnum() else "_" for c in name) + f"-{zlib.crc32(name.encode()):08x}"


def _runs_of(report: dict) -> dict[tuple[str, str], dict]:
    return {(r["dtype"], r["mode"]): r for r in report["runs"]}


def render_chart(report: dict, dtype: str) -> str:
    """Error versus depth: the smallest passing atol of each module in forward order, log scale,
    for both modes and directions, with the atol line. A module is within tolerance iff its
    point is on or under the line."""
    runs = _runs_of(report)
    tf = runs.get((dtype, "teacher_forced"))
    if not tf or tf["status"] != "ran" or not tf["layers"]:
        return "<p>No chart: nothing ran in this dtype.</p>"
    names = [layer["name"] for layer in tf["layers"]]
    atol = float(tf["tolerance"]["atol"])
    values = []
    for mode, direction, _, _ in SERIES:
        run = runs.get((dtype, mode))
        by_name = {layer["name"]: layer for layer in run["layers"]} if run and run["status"] == "ran" else {}
        pts = []
        for i, n in enumerate(names):
            m = by_name.get(n, {}).get(direction)
            if m is not None:
                pts.append((i, max(float(m["needed_atol"]), FLOOR)))
        values.append(pts)
    finite = [v for pts in values for _, v in pts if math.isfinite(v)] + [atol]
    lo = math.floor(math.log10(min(finite + [FLOOR * 10])))
    hi = math.ceil(math.log10(max(finite))) + 1
    W, H, L, R, T, B = 1100, 320, 60, 20, 16, 60
    x = lambda i: L + (W - L - R) * (i / max(len(names) - 1, 1))  # noqa: E731
    y = lambda v: T + (H - T - B) * (hi - math.log10(min(max(v, 10.0**lo), 10.0**hi))) / (hi - lo)  # noqa: E731
    parts = [f'<svg class="chart" role="img" aria-label="error versus depth" viewBox="0 0 {W} {H}" '
             f'width="100%" xmlns="http://www.w3.org/2000/svg">']
    for e in range(lo, hi + 1):
        parts.append(f'<line x1="{L}" x2="{W - R}" y1="{y(10.0**e):.1f}" y2="{y(10.0**e):.1f}" stroke="#eee"/>'
                     f'<text x="{L - 6}" y="{y(10.0**e) + 4:.1f}" text-anchor="end">1e{e}</text>')
    # Decoder-layer boundaries, so depth reads as depth.
    for i, n in enumerate(names):
        parts_ = n.split(".")
        if len(parts_) >= 3 and parts_[-2] == "layers" and parts_[-1].isdigit():
            parts.append(f'<line x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{T}" y2="{H - B}" stroke="#ddd"/>'
                         f'<text x="{x(i):.1f}" y="{H - B + 14}" text-anchor="middle">{esc(parts_[-1])}</text>')
    parts.append(f'<text x="{(W + L) / 2}" y="{H - 18}" text-anchor="middle">module, in forward order '
                 f'(numbers mark the end of each decoder layer)</text>')
    parts.append(f'<line class="tolerance" x1="{L}" x2="{W - R}" y1="{y(atol):.1f}" y2="{y(atol):.1f}" '
                 f'stroke="#b3261e" stroke-width="1.5" stroke-dasharray="6 4"/>'
                 f'<text x="{W - R}" y="{y(atol) - 4:.1f}" text-anchor="end" fill="#b3261e">atol {atol:g}</text>')
    for (mode, direction, colour, dash), pts in zip(SERIES, values):
        if not pts:
            continue
        path = " ".join(f"{'M' if k == 0 else 'L'}{x(i):.1f},{y(v):.1f}" for k, (i, v) in enumerate(pts))
        parts.append(f'<path class="series" data-series="{mode}-{direction}" d="{path}" fill="none" '
                     f'stroke="{colour}" stroke-width="1.4" stroke-dasharray="{dash}"/>')
        if mode == "teacher_forced":
            for i, v in pts:
                parts.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="2.4" fill="{colour}">'
                             f'<title>{esc(names[i])} {direction}: {_f(v)}</title></circle>')
    parts.append("</svg>")
    legend = "".join(
        f'<span><svg width="28" height="8"><line x1="0" x2="28" y1="4" y2="4" stroke="{c}" stroke-width="2" '
        f'stroke-dasharray="{d}"/></svg> {m.replace("_", "-")} {dr}</span>' for m, dr, c, d in SERIES)
    return ("<p>Smallest atol that would pass (at the configured rtol), per module, log scale. "
            "A point under the dashed red line is within tolerance.</p>" + "".join(parts)
            + f'<div class="legend">{legend}</div>')


def _tree(report: dict, dtype: str) -> str:
    runs = _runs_of(report)
    tf, fr = runs.get((dtype, "teacher_forced")), runs.get((dtype, "free_running"))
    if not tf or tf["status"] != "ran":
        return "<p>Nothing ran in this dtype.</p>"
    fr_by = {layer["name"]: layer for layer in fr["layers"]} if fr and fr["status"] == "ran" else {}
    fd, cul = tf["first_divergence"], tf["culprits"]
    amp = set(fr.get("amplifying", [])) if fr else set()
    layers = {layer["name"]: layer for layer in tf["layers"]}
    order = list(layers)

    def parent(name: str) -> str | None:
        if name == "<root>":
            return None
        module = name.split("#")[0]
        while "." in module:
            module = module.rsplit(".", 1)[0]
            if module in layers:
                return module
        return "<root>" if "<root>" in layers else None

    children: dict[str | None, list[str]] = {}
    for n in order:
        children.setdefault(parent(n), []).append(n)

    def failing_within(n: str) -> bool:
        return not layers[n]["passed"] or any(failing_within(c) for c in children.get(n, []))

    def row(n: str, depth: int) -> str:
        layer = layers[n]
        f, b = layer["forward"], layer["backward"]
        r = fr_by.get(n)
        badges = ""
        if n == fd["forward"]:
            badges += '<span class="badge b-fd" id="first-divergence-forward">first divergence (forward)</span>'
        if n == fd["backward"]:
            badges += '<span class="badge b-fd" id="first-divergence-backward">first divergence (backward)</span>'
        if n in cul["forward"] or n in cul["backward"]:
            badges += '<span class="badge b-culprit">culprit</span>'
        if n in amp:
            badges += '<span class="badge b-amp">amplifies</span>'
        cells = [
            f'<span class="name" style="padding-left:{6 + 14 * depth}px" title="{esc(n)}">{esc(n.rsplit(".", 1)[-1] if depth else n)}{badges}</span>',
            f"<span>{esc(layer['type'])}</span>",
            f"<span>{_f(f['max_abs'])}</span>", f"<span>{_f(f['max_rel'])}</span>", f"<span>{_cos(f)}</span>",
            f"<span>{_f(b and b['max_abs'])}</span>", f"<span>{_f(b and b['max_rel'])}</span>", f"<span>{_cos(b)}</span>",
            f"<span>{_f(_headroom(layer))}</span>",
            f"<span>{_f(r and r['forward']['max_abs'])}</span>",
            f"<span>{_f(r and r['backward'] and r['backward']['max_abs'])}</span>",
            f"<span>{_state(layer['passed'], f, b)}</span>",
        ]
        marked = " mark" if n in (fd["forward"], fd["backward"]) else ""
        cls = f"row {'pass' if layer['passed'] else 'fail'}{marked}"
        inner = f'<div class="{cls}" id="{_anchor(n)}" data-module="{esc(n)}">{"".join(cells)}</div>'
        kids = children.get(n, [])
        if not kids:
            return f'<div class="leaf">{inner}</div>'
        opened = " open" if depth < 1 or failing_within(n) else ""
        return (f"<details{opened}><summary>{inner}</summary>"
                + "".join(row(c, depth + 1) for c in kids) + "</details>")

    head = ("<div class='row head'><span>module</span><span>type</span><span>fwd max abs</span><span>fwd max rel</span>"
            "<span>fwd cosine</span><span>bwd max abs</span><span>bwd max rel</span><span>bwd cosine</span>"
            "<span>headroom atol</span><span>free fwd abs</span><span>free bwd abs</span><span></span></div>")
    return ("<p>Teacher-forced: each module on the reference's inputs; <i>headroom atol</i> is the smallest atol "
            "that would pass. The two right columns are free-running max abs errors.</p>"
            f'<div class="tree">{head}' + "".join(row(n, 0) for n in children.get(None, [])) + "</div>")


def _table(headers: list[str], rows: list[tuple[str, list[str]]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(f'<tr class="{cls}">' + "".join(cells) + "</tr>" for cls, cells in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _problems(report: dict) -> str:
    items = "".join(f"<li>{esc(p)}</li>" for p in report.get("problems", []))
    return f'<ul id="problems">{items}</ul>' if items else ""


def render_html(report: dict) -> str:
    """One model's report page, from the report dict alone."""
    verdict = report["verdict"]
    env = report["env"]
    runs_rows = []
    for r in report["runs"]:
        state = "NOT RUN" if r["status"] != "ran" else ("pass" if r["passed"] else "FAIL")
        cls = "na" if r["status"] != "ran" else ("ok" if r["passed"] else "bad")
        where = r["reason"] if r["status"] != "ran" else " / ".join(
            f"{d}: {r['first_divergence'][d]}" for d in ("forward", "backward") if r["first_divergence"][d]) or "-"
        runs_rows.append((cls, [f"<td>{esc(r['dtype'])}</td>", f"<td>{esc(r['mode'].replace('_', '-'))}</td>",
                                f"<td>{'gated' if r['gated'] else 'informational'}</td>", f"<td>{state}</td>",
                                f"<td>{esc(where)}</td>"]))
    links = []
    fd = report["first_divergence"]
    for d in ("forward", "backward"):
        if fd.get(d):
            links.append(f'<a href="#first-divergence-{d}">first divergence ({d}): {esc(fd[d])}</a>')
    culprits = report.get("culprits") or {}
    for d in ("forward", "backward"):
        for c in culprits.get(d, []):
            skipped = culprits.get("uncalled", {}).get(c)
            links.append(f'<a href="#{_anchor(c)}">culprit ({d}): {esc(c)}'
                         f'{esc(" (did not call " + ", ".join(skipped) + ")") if skipped else ""}</a>')
    policies = sorted({r["tolerance"]["policy"] for r in report["runs"]})
    dtypes = list(dict.fromkeys(r["dtype"] for r in report["runs"] if r["status"] == "ran"))
    sections = []
    for dtype in dtypes:
        sections.append(f"<h2 id='chart-{esc(dtype)}'>Error versus depth ({esc(dtype)})</h2>" + render_chart(report, dtype))
        sections.append(f"<h2 id='tree-{esc(dtype)}'>Layer tree ({esc(dtype)})</h2>" + _tree(report, dtype))
    tensor_rows = [("ok" if t["passed"] else "bad",
                    [f"<td>{kind}</td>", f"<td>{esc(t['name'])}</td>", f"<td class=num>{_f(t['max_abs'])}</td>",
                     f"<td class=num>{_f(t['max_rel'])}</td>", f"<td class=num>{float(t['cosine']):.6f}</td>",
                     f"<td class=num>{_f(t['needed_atol'])}</td>", f"<td>{esc(_judged(t))}</td>",
                     f"<td>{_state(t['passed'], t)}</td>"])
                   for kind, items in (("output", report["outputs"]), ("param grad", report["param_grads"]),
                                       ("input grad", report.get("input_grads", [])))
                   for t in items]
    weight_rows = [("ok" if w["exact"] else ("na" if w["exact"] is None else "bad"),
                    [f"<td>{esc(w['source'])}</td>", f"<td>{esc(str(w['target']))}</td>",
                     f"<td>{esc(str(w['source_shape']))}</td>", f"<td>{esc(str(w['target_shape']))}</td>",
                     f"<td>{esc(w['transform'])}</td>", f"<td>{esc(w.get('rule', ''))}</td>",
                     f"<td>{'-' if w['exact'] is None else ('yes' if w['exact'] else 'NO')}</td>"])
                   for w in report["weights"]]
    seen_by = {"gate": "as the forced pass saw them", "stream": "as the forced passes saw them"}.get(
        report.get("path"), "free-running")
    loaded = [w["exact"] for w in report["weights"] if w["exact"] is not None]
    weights_said = (f"{sum(loaded)} of {len(loaded)} loaded port tensors bit-exact with their source. "
                    f"'-': {len(report['weights']) - len(loaded)} not loaded in this run (tied to another tensor, "
                    "ignored by the rules" + (", or in a block --only did not choose" if report.get("path") == "stream"
                                              and report.get("only") else "") + ").")
    notes = []
    if report.get("only"):
        notes.append(f"<li><b>partial</b>: the report is limited to <code>--only {esc(' '.join(report['only']))}</code></li>")
    if report.get("shell_judged") is False:
        notes.append("<li><b>partial</b>: streamed, <code>--only</code> chose no module of the shell, which was not run: "
                     "no model outputs, and only the chosen blocks' parameter gradients</li>")
    notes += [f"<li>{esc(w)}</li>" for w in report["warnings"]]
    notes += [f"<li><b>{esc(f['kind'])}</b>: {esc(f['message'])}</li>" for f in report.get("findings", [])
              if f["kind"] != "observer_effect"]
    notes += [f"<li>unpaired {esc(u['side'])} module <code>{esc(u['name'])}</code>: {esc(u['reason'])}</li>"
              for u in report["unpaired"]]
    observer = "".join(
        f"<li>{esc(o['framework'])}, with hooks vs without: {esc(o.get('state', ''))}"
        f"{' (the run without hooks on a copy, alongside the others)' if o.get('alongside') else ''}</li>"
        for o in report.get("observer", []))
    env_public = {k: v for k, v in env.items() if k != "dtypes"}
    dtype_rows = [("ok" if (d["port"] in (None, d["reference"])) else "bad",
                   [f"<td>{esc(k)}</td>", f"<td>{esc(str(d['reference']))}</td>", f"<td>{esc(str(d['port_name']))}</td>",
                    f"<td>{esc(str(d['port']))}</td>"]) for k, d in env.get("dtypes", {}).items()]
    messages = "".join(f"<pre>{esc(m)}</pre>" for m in failure_messages(report))
    repro = (f"<p>Standalone repro of the first culprit: <code>{esc(report['repro'])}/repro.py</code></p>"
             if report.get("repro") else "")
    if report.get("kept"):
        k = report["kept"]
        repro += (f"<p>Kept in full (--keep {esc(' '.join(k['globs']))}): {k['tensors']} port tensors, each beside "
                  f"the reference's, in <code>{esc(k['path'])}/tensors.safetensors</code> "
                  f"(named in <code>{esc(k['path'])}/index.json</code>)</p>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>align: {esc(report['model'])} {esc(verdict)}</title><style>{CSS}</style></head><body>
<header class="verdict {esc(verdict)}" id="verdict">
<h1>{esc(report['model'])}: {esc(verdict.upper())}</h1>
<div class="meta">{esc(report['config'])} config · port {esc(report['port'])}{' (its own loader)' if report.get('weights_from') == 'pretrained' else ''} · {esc(report['created'])} ·
torch {esc(str(env.get('torch')))} · paddle {esc(str(env.get('paddle')))} · transformers {esc(str(env.get('transformers')))}</div>
<div class="meta">Reproduce: <code>{esc(report['command'])}</code></div>
<nav class="meta">{' · '.join(links) or 'no divergence'}</nav>
</header>
<main>
{_table(['dtype', 'mode', 'gate', 'result', 'first divergence / reason'], runs_rows)}
<p id="judged-by"><b>Tolerance.</b> {esc(judged_line(report) or '')}<br>{'<br>'.join(esc(p) for p in policies)}</p>
<p><b>Gate.</b> Aligned when every teacher-forced module passes forward and backward, the model outputs, every
parameter gradient and every input gradient pass, every module is paired, no finding fails and every weight loaded
bit-exact.</p>
{_problems(report)}
{repro}{messages}
{''.join(sections)}
<h2 id="outputs">Model outputs and parameter gradients ({esc(seen_by)})</h2>
{_table(['kind', 'name', 'max abs', 'max rel', 'cosine', 'headroom atol', 'judged by', ''], tensor_rows)}
<h2 id="weights">Weight map</h2>
<p>{esc(weights_said)}</p>
{_table(['source (reference)', 'target (port)', 'source shape', 'target shape', 'transform', 'rule', 'bit-exact'], weight_rows)}
<h2 id="environment">Environment, warnings and findings</h2>
<ul id="warnings">{''.join(notes) or '<li>none</li>'}</ul>
<p>Observer check:</p><ul>{observer or '<li>not run</li>'}</ul>
<pre>{esc(json.dumps(env_public, indent=1))}</pre>
<details><summary>dtype of every parameter and buffer</summary>
{_table(['reference tensor', 'reference dtype', 'port tensor', 'port dtype'], dtype_rows)}</details>
</main></body></html>
"""


def render_index(latest: dict[str, dict], history: list[dict]) -> str:
    """The dashboard: latest verdict per model and dtype, worst teacher-forced error, recent runs."""
    rows = []
    for model in sorted(set(latest) | {h["model"] for h in history}):
        report = latest.get(model)
        runs = history_of(history, model)[-10:]
        trail = "".join(
            f'<span class="badge {"b-ok" if h["verdict"] == "pass" else "b-fd"}" '
            f'title="{esc(h["created"])} ({esc(h.get("config", "?"))} config): {esc(h["verdict"])}, '
            f'worst {_f(h.get("worst_teacher_forced"))}">'
            f'{esc(h["verdict"])}</span>' for h in runs)
        worst = [f"{_f(h.get('worst_teacher_forced'))}" for h in runs]
        if report is None:
            rows.append(("na", [f"<td>{esc(model)}</td>", "<td colspan=4>no report.json</td>", f"<td>{trail}</td>"]))
            continue
        per_dtype = ", ".join(
            f"{esc(r['dtype'])}: {'not run' if r['status'] != 'ran' else ('pass' if r['passed'] else 'FAIL')}"
            for r in report["runs"] if r["mode"] == "teacher_forced")
        rows.append(("ok" if report["verdict"] == "pass" else "bad", [
            f'<td><a href="{esc(model)}/report.html">{esc(model)}</a></td>',
            f"<td>{esc(report['verdict'])}</td>", f"<td>{per_dtype}</td>",
            f"<td class=num>{_f(worst_teacher_forced(report))}</td>",
            f"<td>{esc(report['created'])}<br><small>{esc(report['config'])} config</small></td>",
            f"<td>{trail}<br><small>worst: {' → '.join(worst)}</small></td>"]))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>align dashboard</title>
<style>{CSS} .b-ok{{background:#1f7a3a}}</style></head><body>
<header class="verdict {'pass' if all(r.get('verdict') == 'pass' for r in latest.values()) and latest else 'fail'}">
<h1>align dashboard</h1><div class="meta">{len(latest)} model(s), latest run of each; oldest to newest on the right</div></header>
<main>{_table(['model', 'verdict', 'per dtype (teacher-forced)', 'worst teacher-forced max abs', 'latest run', 'recent runs'], rows)}</main>
</body></html>
"""


def worst_teacher_forced(report: dict) -> float | None:
    values = [float(m["max_abs"]) for r in report["runs"] if r["status"] == "ran" and r["mode"] == "teacher_forced"
              for layer in r["layers"] for m in (layer["forward"], layer["backward"]) if m is not None]
    return max(values) if values else None


def history_of(history: list[dict], model: str) -> list[dict]:
    return [h for h in history if h.get("entry", h["model"]) == model]  # entry: the report's directory
