"""Alignment overhead against a bare forward + backward of both models, measured in one run.

    .venv/bin/python benchmarks/bench_overhead.py [--configs tiny,mid] [--no-padiff] [--repeat 3]

For each config (the tiny Gemma2, and a mid-size one: 8 layers, hidden 512, 256 tokens, weights
drawn with Gemma2's initializer_range 0.02; see common.CONFIGS), each
phase in its own fresh process (same inputs, same default threads, torch and paddle imported
before any clock starts), the phases taking turns `--repeat` times and each keeping its
fastest process (on this VM the first touch of fresh memory costs about 3.5 s per GB, and
how much of it a process meets varies from run to run):
- bare: build both models and load the weights, then one forward + backward of each with no
  hooks. The first such pass is "cold" (what any process that runs the models once pays:
  kernel selection, allocator growth); a second one is "warm".
- gate path: `align_model(..., fast=True)`: the reference under hooks, then one forced
  pass of the port (every module teacher-forced, forward and backward).
- full path: `align_model(...)`: the gate path plus the port free-running (compared as it
  goes) and both observer runs (each model once more without hooks; the port's on a copy,
  alongside the forced pass, when there is a core and memory to spare).
For the align phases the clock covers the whole call; "alignment" is that minus building the
two models and loading the weights, which the bare run needs too and does not time. The
ratio is alignment / bare cold (and / bare warm, for the pessimist). Peak RSS is each
process's own VmHWM, taken after its first call. Each align process then calls
`align_model` once more: that second call's alignment time ("warm", the fastest over the
processes) is what PaDiff, timed after its own bare passes, is compared with.
PaDiff 0.2.0 (in .venv-padiff, see `make venv-padiff`) runs `benchmarks/padiff_run.py` on the
same models, API mode off and on; its time is compared with our gate and full paths, warm.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import CONFIGS, RESULTS, ROOT, update_readme

PADIFF_PY = ROOT / ".venv-padiff" / "bin" / "python"

CHILD = r"""
import json, sys, time
import torch, paddle
HWM = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
from align import builders, weights as W
from align.builders.backward import backward_seed
from align.core.port import align_model
from align.weights.loader import load_weights
from align.capture.paddle_side import PaddleSide
from align.capture.torch_side import TorchSide
sys.path.insert(0, "benchmarks")
from common import bench_spec
phase = sys.argv[1]
spec, config = bench_spec(sys.argv[2])
def timed():
    marks = []
    t0 = time.perf_counter()
    report = align_model(spec, config, ("float32",), fast=phase == "gate",
                         progress=lambda s: marks.append((time.perf_counter() - t0, s)))
    total = time.perf_counter() - t0
    at = lambda prefix: next(t for t, s in marks if s.startswith(prefix))
    # Building the reference (seeded init), and building the port + loading its weights.
    build_s = (at("running the reference") - at("building the reference")) + (at("float32:") - at("building the port"))
    return total, build_s, report
if phase in ("gate", "full"):
    total, build_s, report = timed()
    rss = HWM()
    # Once more in the same process (warm), as PaDiff is timed after its own bare passes.
    warm_total, warm_build, _ = timed()
    print(json.dumps({"seconds": total, "build_s": build_s, "rss_mb": rss, "verdict": report.verdict,
                      "warm_align_s": warm_total - warm_build}))
else:
    ts, ps = TorchSide(), PaddleSide()
    cfg = builders.reference_config(spec, config)
    ref, port = builders.build_reference(spec, cfg), builders.build_port(spec, cfg)
    load_weights(W.load_rules(spec.weights_file), {k: ts.record(v).data for k, v in ref.state_dict().items()},
                  port, ps, builders.values_of(cfg))
    inputs = builders.make_inputs(spec, builders.values_of(cfg))
    def both():
        t = time.perf_counter()
        for fw, model in ((ts, ref), (ps, port)):
            fw.clear_grads(model)
            out = model(**{k: fw.tensor(a, False) for k, a in inputs.items()})
            fw.backward(backward_seed(fw, spec)(out))
        return time.perf_counter() - t
    cold = both()
    warm = both()
    print(json.dumps({"cold_s": cold, "warm_s": warm, "rss_mb": HWM()}))
"""


def child(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def padiff(config: str, python: Path, repeat: int) -> dict[str, dict]:
    """PaDiff's auto_diff, API mode off and on, each run by padiff_run.py in its own process."""
    if not python.is_file():
        print(f"PaDiff not measured: no {python} (make venv-padiff)", file=sys.stderr)
        return {}
    rows = {}
    for mode in ("api-off", "api-on"):
        out = subprocess.run([str(python), str(ROOT / "benchmarks" / "padiff_run.py"), "--config", config,
                              "--mode", mode, "--repeat", str(repeat),
                              "--out", str(RESULTS / f"padiff-{config}-{mode}.json")],
                             capture_output=True, text=True, cwd=ROOT)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        rows[mode] = json.loads(lines[-1]) if out.returncode == 0 and lines else {"error": out.stderr[-500:]}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="tiny,mid")
    ap.add_argument("--no-padiff", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="processes per phase; each phase keeps its fastest")
    ap.add_argument("--padiff-python", type=Path, default=PADIFF_PY, help="the python of PaDiff's environment")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    for key in args.configs.split(","):
        name = CONFIGS[key][0]
        # The phases take turns, `--repeat` times, and each keeps its fastest process: how
        # much fresh memory this VM must fault in varies from process to process.
        runs: dict[str, list[dict]] = {"bare": [], "gate": [], "full": []}
        for _ in range(args.repeat):
            for phase in runs:
                runs[phase].append(child(phase, key))
        bare = min(runs["bare"], key=lambda r: r["cold_s"])
        bare["warm_s"] = min(r["warm_s"] for r in runs["bare"])
        gate, full = (min(runs[p], key=lambda r: r["seconds"] - r["build_s"]) for p in ("gate", "full"))
        row = {"config": name, "repeat": args.repeat, "bare_cold_s": round(bare["cold_s"], 3),
               "bare_warm_s": round(bare["warm_s"], 3), "bare_rss_mb": round(bare["rss_mb"]),
               "samples_s": {"bare_cold": [round(r["cold_s"], 3) for r in runs["bare"]],
                             **{p: [round(r["seconds"] - r["build_s"], 2) for r in runs[p]] for p in ("gate", "full")}}}
        for path, r in (("gate", gate), ("full", full)):
            align_s = r["seconds"] - r["build_s"]
            row[path] = {"total_s": round(r["seconds"], 2), "build_s": round(r["build_s"], 2),
                         "align_s": round(align_s, 2),
                         "align_warm_s": round(min(x["warm_align_s"] for x in runs[path]), 3),
                         "ratio_cold": round(align_s / bare["cold_s"], 2),
                         "ratio_warm": round(align_s / bare["warm_s"], 2), "rss_mb": round(r["rss_mb"]),
                         "rss_ratio": round(r["rss_mb"] / bare["rss_mb"], 2), "verdict": r["verdict"]}
        if not args.no_padiff:
            row["padiff"] = padiff(key, args.padiff_python, args.repeat)
        rows.append(row)
        print(json.dumps(row))
    (RESULTS / "overhead.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = render(rows)
    print(table)
    update_readme("overhead", table)


def render(rows: list[dict]) -> str:
    lines = ["| config | bare fwd+bwd, both (cold / warm) | path | alignment time | ratio to bare cold (warm) "
             "| end to end (build + load) | peak RSS (vs bare) | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for path, label in (("gate", "gate (`--fast`)"), ("full", "full diagnostic")):
            p = r[path]
            lines.append(f"| {r['config']} | {r['bare_cold_s']} / {r['bare_warm_s']} s | {label} | {p['align_s']} s "
                         f"(warm {p['align_warm_s']} s) | "
                         f"**{p['ratio_cold']}x** ({p['ratio_warm']}x) | {p['total_s']} s ({p['build_s']} s) | "
                         f"{p['rss_mb']} MB ({p['rss_ratio']}x of {r['bare_rss_mb']} MB) | {p['verdict']} |")
    if any(r.get("padiff") for r in rows):
        lines += ["", "| config | PaDiff 0.2.0 auto_diff (warm) | seconds | its ratio to its own bare run "
                  "| vs our full path (warm) | vs our gate path (warm) | peak RSS | PaDiff's verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            for mode, p in (r.get("padiff") or {}).items():
                if p.get("seconds") is None:
                    lines.append(f"| {r['config']} | API mode {mode[4:]} | did not run to the end | - | - | - | - | "
                                 f"{str(p.get('error') or p.get('padiff_verdict'))[:80]} |")
                    continue
                lines.append(f"| {r['config']} | API mode {mode[4:]} | {p['seconds']:.2f} s | "
                             f"{p.get('ratio_config', p.get('ratio', 0)):.2f}x | "
                             f"PaDiff takes {p['seconds'] / r['full']['align_warm_s']:.1f}x our time | "
                             f"{p['seconds'] / r['gate']['align_warm_s']:.1f}x | {p.get('peak_rss_mb', 0):.0f} MB | "
                             f"{p.get('padiff_verdict', '?')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
