"""A report's directory on disk: report.json (the only truth), report.html rendered from it,
the first culprit's repro, the tensors --keep asked for; and across reports, the history
and the dashboard. Everything is written whole or not at all (align.atomic).

    reports/<model>/report.json, report.html, repro/, kept/
    reports/history.jsonl, reports/index.html
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from align.atomic import write_atomic
from align.compare.keep import KeptTensor
from align.weights.safetensors_io import contiguous, save_arrays


def report_dir(root: Path, model: str, port: str) -> Path:
    """reports/<model>/ for the hand port, reports/<model>-<port>/ for a generated one."""
    return root / (model if port == "hand" else f"{model}-{port}")


def write_result(result: Any, out: Path, keep: tuple[str, ...], seconds: float) -> tuple[dict, tuple[Path, ...]]:
    """Write one run's report directory `out` from its Report: the tensors beside it (the
    first culprit's repro, what --keep asked for; an earlier run's are removed), report.json
    and report.html, its line in the history and the dashboard. Returns the report exactly
    as report.json holds it, and the paths written."""
    report = result.to_dict()
    if result.repro is not None:
        report["repro"] = str(result.repro.write(out / "repro").relative_to(out))
    elif (out / "repro").is_dir():
        shutil.rmtree(out / "repro")  # a passing run leaves no stale repro of an old failure behind
    if keep:
        report["kept"] = {"path": str(write_kept(result.kept, keep, out / "kept").relative_to(out)),
                          "globs": list(keep), "tensors": len(result.kept)}
    elif (out / "kept").is_dir():
        shutil.rmtree(out / "kept")  # tensors kept by an earlier run are not this report's
    report["duration_s"] = round(seconds, 3)
    report = as_json(report)
    paths = write_report(report, out)
    append_history(report, out.parent, out.name)
    return report, (*paths, write_index(out.parent))


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write report.json and report.html into out_dir; returns both paths."""
    from align.report.html import render_html

    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    write_atomic(json_path, dumps(report))
    write_atomic(html_path, render_html(report))
    return json_path, html_path


HISTORY = "history.jsonl"


def append_history(report: dict, reports_root: Path, entry: str | None = None) -> None:
    """One line per run in reports/history.jsonl, so the dashboard can show a regression.
    `entry` is the report's directory under reports_root (reports/<model>-converted/ for a
    generated port): the dashboard keeps one row per entry, so two ports never share one."""
    from align.report.html import worst_teacher_forced

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
    from align.report.html import render_index

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


# Metric fields that may be infinite (a missing tensor) or NaN. Strict JSON has no such
# numbers, so they are written as the strings "inf", "-inf" and "nan" and read back.
_FLOAT_FIELDS = frozenset({"max_abs", "mean_abs", "max_rel", "cosine", "needed_atol", "headroom", "truth_error",
                           "reference_error"})


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


def write_kept(kept: tuple[KeptTensor, ...], globs: tuple[str, ...], out_dir: Path) -> Path:
    """Write `out_dir` (replacing it) with tensors.safetensors and index.json; whole or not
    at all. Each pair is stored as `<key>|port` and `<key>|reference` (see KeptTensor.key)."""
    from align.atomic import write_folder

    tensors: dict[str, np.ndarray] = {}
    index = []
    for k in kept:
        key, n = k.key, 1
        while f"{key}|port" in tensors:  # not expected (labels are unique per owner), but never overwrite
            n += 1
            key = f"{k.key}#{n}"
        tensors[f"{key}|port"], tensors[f"{key}|reference"] = contiguous(k.port), contiguous(k.reference)
        index.append({"dtype": k.dtype, "mode": k.mode, "owner": k.owner, "direction": k.direction,
                      "label": k.label, "shape": list(k.reference.shape),
                      "port": f"{key}|port", "reference": f"{key}|reference"})

    def fill(tmp: Path) -> None:
        save_arrays(tensors, tmp / "tensors.safetensors")
        (tmp / "index.json").write_text(json.dumps({"globs": list(globs), "tensors": index}, indent=1) + "\n")

    return write_folder(out_dir, fill)
