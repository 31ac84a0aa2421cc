"""JUnit XML from report.json files: one test case per model, dtype and mode.

The teacher-forced case of each dtype carries the gate (it also fails on the model outputs,
parameter gradients, findings, unpaired modules and weights). Free-running cases are
informational and pass, with their numbers in system-out. A dtype that did not run is a
skipped case whose message says why.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from align.report.messages import failure_messages


def _gate_problems(report: dict) -> list[str]:
    """What fails the gate beyond the teacher-forced modules (those the case's own summary
    and culprits say): the report's problems, the runs' own left out."""
    return [p for p in report.get("problems", []) if not p.startswith(tuple(
        f"{r['dtype']} {r['mode'].replace('_', '-')}:" for r in report["runs"]))]


def render_junit(reports: list[dict]) -> str:
    suites = ET.Element("testsuites", name="align")
    totals = {"tests": 0, "failures": 0, "skipped": 0}
    for report in reports:
        suite = ET.SubElement(suites, "testsuite", name=report["model"], timestamp=report["created"])
        counts = {"tests": 0, "failures": 0, "skipped": 0}
        for run in report["runs"]:
            mode = run["mode"].replace("_", "-")
            name = f"{run['dtype']} {mode}" + ("" if run["gated"] else " (informational)")
            case = ET.SubElement(suite, "testcase", classname=f"align.{report['model']}", name=name,
                                 time=f"{report.get('duration_s', 0.0):.3f}")
            counts["tests"] += 1
            if run["status"] != "ran":
                ET.SubElement(case, "skipped", message=f"not run: {run['reason']}")
                counts["skipped"] += 1
                continue
            layers = run["layers"]
            ok = sum(layer["passed"] for layer in layers)
            summary = f"{ok}/{len(layers)} modules within tolerance; {run['tolerance']['policy']}"
            if not run["gated"]:
                fd = run["first_divergence"]
                ET.SubElement(case, "system-out").text = (
                    f"{summary}; not gated. First divergence: forward {fd['forward']}, backward {fd['backward']}")
                continue
            problems = _gate_problems(report)
            if run["passed"] and not problems:
                ET.SubElement(case, "system-out").text = summary
                continue
            culprits = run["culprits"]
            named = [f"{d} culprit {c}" for d in ("forward", "backward") for c in culprits[d][:3]]
            message = "; ".join(named + problems) or "not aligned"
            failure = ET.SubElement(case, "failure", message=f"{report['model']} not aligned: {message}",
                                    type="NotAligned")
            failure.text = "\n\n".join([summary, *failure_messages(report)])
            counts["failures"] += 1
        for k, v in counts.items():
            suite.set(k, str(v))
            totals[k] += v
    for k, v in totals.items():
        suites.set(k, str(v))
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
