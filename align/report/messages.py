"""Mismatch messages, as torch.testing words them: what, where, how much, the allowance, and
the command that reruns just that module."""

from __future__ import annotations

from align.capture.trace import FORWARD
from align.compare.metrics import Metrics
from align.registry.spec import Tolerance


def mismatch_message(name: str, direction: str, m: Metrics, tol: Tolerance, dtype: str, mode: str,
                     rerun: str = "") -> str:
    """A torch.testing-style account of one failing comparison (and how to rerun just it)."""
    what = "forward output" if direction == FORWARD else "gradient"
    lines = [f"{name}: {what} is not close! ({dtype}, {mode.replace('_', '-')})"]
    if m.note:
        lines.append(m.note)
    if m.numel:
        lines.append(f"Mismatched elements: {m.mismatched} / {m.numel} ({100.0 * m.mismatched / m.numel:.1f}%)")
        lines.append(f"Greatest absolute difference: {m.max_abs:.3g} at {m.worst} (up to {tol.atol:g} allowed)")
        lines.append(f"Greatest relative difference: {m.max_rel:.3g} (up to {tol.rtol:g} allowed)")
        lines.append(f"Cosine {m.cosine:.6f} | smallest passing atol {m.needed_atol:.3g}")
    if rerun:
        lines.append(f"Rerun: {rerun}")
    return "\n".join(lines)


# Options of `align run` and `align check` that choose what is aligned or how it is judged
# (kept in a rerun; the flags among them take no value), and those that do not.
_RERUN_KEEPS = {"--registry", "--config", "--checkpoint", "--weights-from", "--trace", "--stream-layers", "--strict"}
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
        elif name.startswith("-") and name not in _RERUN_KEEPS:
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
    from align.registry.spec import port_variant_of

    rerun = rerun_command(report, report_run["dtype"], module, port_variant_of(report["port"])) \
        if module != "<root>" else ""
    message = mismatch_message(name, direction, m, Tolerance(**layer["tolerance"]), report_run["dtype"],
                               report_run["mode"], rerun)
    skipped = report_run["culprits"].get("uncalled", {}).get(name)
    return message + (f"\nIt never called {', '.join(skipped)}, which the reference's calls" if skipped else "")


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
    # the model's outputs and gradients are the free-running run's on the full path, and what
    # the forced passes saw on the gate and streamed paths, which run nothing else
    mode = "free_running" if report.get("path", "full") == "full" else "teacher_forced"
    for kind, items in (("model output", report["outputs"]), ("parameter gradient", report["param_grads"]),
                        ("input gradient", report.get("input_grads", []))):
        bad = [i for i in items if not i["passed"]]
        for item in bad[:3]:
            m = Metrics(**{k: v for k, v in item.items() if k not in ("name", "tolerance")})
            messages.append(mismatch_message(f"{kind} {item['name']}", "forward" if kind == "model output" else "backward",
                                             m, Tolerance(**item["tolerance"]), "float32", mode))
        if len(bad) > 3:
            messages.append(f"... and {len(bad) - 3} more failing {kind}s")
    return messages


RULES = {"float64": "the literal tolerance, then the float64 truth",
         "strict": "the literal tolerance alone (strict)",
         "literal": "the literal tolerance alone (the model has no float64 path)"}


def judged_line(report: dict) -> str | None:
    """Which rule judged fp32, and the literal figure: the worst error against the literal
    allowance and its headroom, whatever the rule."""
    judged = report.get("judged_by")
    if not judged:
        return None
    line = f"judged by {RULES.get(judged['rule'], judged['rule'])}"
    lit = judged.get("literal")
    if lit:
        headroom = "exact" if lit["headroom"] is None else f"headroom {lit['headroom']:.2g}x"
        line += (f"; literal figure: worst {lit['needed_atol']:.3g} at {lit['where']} against atol {lit['atol']:g} "
                 f"({headroom}{'' if lit['met'] else ', beyond the literal rule'})")
    if judged.get("passed_by_truth"):
        n = len(judged["passed_by_truth"])
        line += f"; {n} comparison{'s' if n > 1 else ''} passed by the float64 truth"
    return line
