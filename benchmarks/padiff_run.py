"""PaDiff 0.2.0's `auto_diff` on the pair of models bench_overhead.py times, API mode off and on.

Runs in its own environment (PaDiff is never a dependency of align):

    make venv-padiff
    .venv-padiff/bin/python benchmarks/padiff_run.py --repeat 3         # tiny and mid, all four modes
    .venv-padiff/bin/python benchmarks/padiff_run.py --config tiny --mode api-on
    .venv-padiff/bin/python benchmarks/padiff_run.py --config mid --atol 1e-4 --rtol 1e-4   # loosened
    .venv-padiff/bin/python benchmarks/padiff_run.py --raw              # PaDiff's defaults, no accommodation
    .venv-padiff/bin/python benchmarks/padiff_run.py --bug --out /tmp/x.json   # does it localise a real bug?

Modes: API mode off or on (PADIFF_API_CHECK), each with or without options["single_step"]
(PaDiff's teacher forcing). Each (config, mode) runs in a fresh process, which:
- builds the gemma2 reference (transformers) and the hand port (ports.text.gemma2) exactly as
  bench_overhead.py's bare phase does: align's seeded init, align's weight rules (loaded and
  verified bit-exact), align's seeded inputs; configs tiny (align.toml) and mid
  (common.MID, 256 tokens, weights drawn with std 0.02); default threads, as bench_overhead.py;
- times a bare forward + backward of both models (after one warm-up), with no hooks: the
  fastest of three passes (bench_overhead.py times one; see BARE_REPEATS);
- only then imports padiff (its API mode, PADIFF_API_CHECK=ON, wraps about 960 torch and
  paddle functions and Tensor methods for the whole process, which would slow the bare run;
  PaDiff's FAQ itself suggests importing it late), and times one `auto_diff` call;
- reports VmHWM after the bare phase and at the end (its own process, so its own peak), and
  CPU time over all threads beside wall time (other load on the machine disturbs it less).

One JSON object per run goes to stdout; all of them to benchmarks/results/padiff.json.
PaDiff's own output goes to a log file per run (named in the JSON), and its diff_log/ (it
writes one under sys.path[0]) to the same scratch directory, never into the repository.

Accommodations (each recorded in the JSON `notes`; --raw turns them all off):
- the models are called through thin wrappers that return (loss, logits): PaDiff flattens
  outputs with paddle.utils.flatten, which does not open the port's output dataclass, so the
  root's forward comparison would compare nothing (and its default loss, the mean of the
  output tensors, fails on the paddle side);
- loss_fn picks that loss on both sides: backward differentiates the model's own loss, as
  align does, and PaDiff compares the two losses;
- layer_map pairs the two lm_heads: PaDiff transposes the weight of every class named Linear,
  and the port's lm_head is a paddle.compat.nn.Linear ([out, in], tied to the embedding);
  a mapped layer is compared by its output and left out of the weight/grad pairing (its tied
  weight is still checked through embed_tokens, the same parameter);
- auto_weights=False: the weights are align's, already loaded bit-exact (PaDiff's own copy
  pairs parameters by definition order and would transpose the tied lm_head);
- options compare_mode="strict", atol=1e-5, rtol=1e-5: align's fp32 tolerance, elementwise
  (PaDiff's default "mean" compares the two tensors' means, atol 0, rtol 1e-7).
Its inputs stay a dict of keyword arguments (auto_diff requires one and calls model(**inputs)):
the root's input gradients it checks first are empty either way, since token ids are integers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The overhead benchmark's pair, built the same way.
from common import CONFIGS, RESULTS, ROOT, bench_spec

# PADIFF_API_CHECK (PaDiff 0.2.0 turns API mode on when it is unset), and options["single_step"]:
# PaDiff's teacher forcing, which feeds each paddle layer the torch layer's output (forward) and
# output gradient (backward), as align's gated mode does.
MODES = {"api-off": ("OFF", False), "api-on": ("ON", False),
         "api-off-single-step": ("OFF", True), "api-on-single-step": ("ON", True)}
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}  # align.toml [defaults.tolerance.float32]
# bench_overhead.py times one bare pass. On a loaded 2-core machine torch's two intra-op threads
# can stall a tiny pass from 0.02 s to 2.5 s, so the fastest of three is taken.
BARE_REPEATS = 3
SAID = re.compile(r"\s*(\w+Error\b|Mismatched elements|Max absolute|Max relative|[\w.]+\.(weight|bias)$)")


def _loss_and_logits(base: type) -> type:
    """A wrapper class (of torch's Module or paddle's Layer) whose forward returns the wrapped
    model's (loss, logits): PaDiff finds no tensor inside the port's output dataclass."""

    class Pair(base):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, **kw):
            out = self.m(**kw)
            return out.loss, out.logits

    return Pair


def hwm_mb() -> float:
    """This process's peak RSS so far (VmHWM; ru_maxrss would be inherited across exec)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 1024


def wrapped_count() -> int:
    """How many torch and paddle callables PaDiff's API mode replaced (0 with it off)."""
    count = 0
    for name in ("torch", "torch.nn.functional", "torch.linalg", "torch.fft", "paddle", "paddle.nn.functional",
                 "paddle.linalg", "paddle.fft", "paddle.signal"):
        module = sys.modules.get(name)
        if module is not None:
            count += sum(getattr(v, "padiff_wrapped", None) is True for v in list(vars(module).values()))
    for cls in (sys.modules["torch"].Tensor, sys.modules["paddle"].Tensor):
        count += sum(getattr(v, "padiff_wrapped", None) is True for v in list(vars(cls).values()))
    return count


def child(config: str, mode: str, raw: bool, scratch: Path, bug: bool = False, tolerance: dict | None = None) -> dict:
    """One (config, mode) in this process; returns the JSON record."""
    import torch

    from align import builders
    from align import weights as W
    from align.builders.backward import backward_seed
    from align.capture.paddle_side import PaddleSide, paddle
    from align.capture.torch_side import TorchSide
    from align.weights.loader import load_weights

    name = CONFIGS[config][0]
    spec, config_arg = bench_spec(config)
    notes: list[str] = []
    load_before = os.getloadavg()[0]
    record = {"config": name, "mode": mode, "raw": raw, "bug": bug, "seconds": None, "bare_seconds": None,
              "ratio": None, "peak_rss_mb": None, "bare_peak_rss_mb": None, "padiff_verdict": None,
              "padiff_message": None, "notes": notes}

    # The pair, exactly as bench_overhead.py's bare phase builds it.
    ts, ps = TorchSide(), PaddleSide()
    cfg = builders.reference_config(spec, config_arg)
    ref, port = builders.build_reference(spec, cfg), builders.build_port(spec, cfg)
    wmap = load_weights(W.load_rules(spec.weights_file), {k: ts.record(v).data for k, v in ref.state_dict().items()},
                         port, ps, builders.values_of(cfg))
    assert wmap.all_exact, "align's weight load is not bit-exact"
    inputs = builders.make_inputs(spec, builders.values_of(cfg))

    def once(fw, model):
        fw.clear_grads(model)
        out = model(**{k: fw.tensor(a, False) for k, a in inputs.items()})
        fw.backward(backward_seed(fw, spec)(out))

    for fw, model in ((ts, ref), (ps, port)):
        once(fw, model)  # warm-up
    bare, bare_cpu = [], []
    for _ in range(BARE_REPEATS):
        t, c = time.perf_counter(), time.process_time()
        for fw, model in ((ts, ref), (ps, port)):
            once(fw, model)
        bare.append(time.perf_counter() - t)
        bare_cpu.append(time.process_time() - c)
    record["bare_seconds"] = min(bare)
    record["bare_samples"] = bare
    # CPU time of all this process's threads: less disturbed than wall time by other load.
    record["bare_cpu_seconds"] = min(bare_cpu)
    record["bare_peak_rss_mb"] = hwm_mb()
    ts.clear_grads(ref)
    ps.clear_grads(port)
    notes.append(f"threads: defaults, as bench_overhead.py (torch intra-op {torch.get_num_threads()}, "
                 f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")

    # PaDiff writes diff_log/ under sys.path[0]: point that at the scratch directory.
    sys.path.insert(0, str(scratch))
    os.chdir(scratch)
    log_path = scratch / "padiff.log"
    with open(log_path, "w") as log, contextlib.redirect_stdout(log):
        t_import = time.perf_counter()
        import padiff
        from padiff import auto_diff

        import_s = time.perf_counter() - t_import
    notes.append(f"PADIFF_API_CHECK={os.environ.get('PADIFF_API_CHECK')}; padiff {padiff.__version__} imported "
                 f"after the bare run ({import_s:.2f} s, not timed); torch and paddle functions and Tensor methods "
                 f"it wrapped for the rest of the process: {wrapped_count()}")
    if bug:
        w = port.model.layers[1].post_feedforward_layernorm.weight
        w.set_value(w + 1.0)
        notes.append("--bug: the port's model.layers.1.post_feedforward_layernorm.weight + 1 (after the bare run)")

    p_in = {k: ps.tensor(a, False) for k, a in inputs.items()}
    t_in = {k: ts.tensor(a, False) for k, a in inputs.items()}
    if raw:
        layer, module, kwargs = port, ref, {"options": {"single_step": True}} if MODES[mode][1] else {}
        notes.append("raw: PaDiff's defaults (auto_weights=True, compare_mode mean, atol 0, rtol 1e-7, "
                     "its own loss: the mean of the output tensors), models called directly")
    else:
        layer, module = _loss_and_logits(paddle.nn.Layer)(port), _loss_and_logits(torch.nn.Module)(ref)
        single_step = MODES[mode][1]
        tolerance = tolerance or TOLERANCE
        kwargs = {"auto_weights": False, "options": {"compare_mode": "strict", **tolerance, "single_step": single_step},
                  "loss_fn": (lambda out: out[0], lambda out: out[0]),
                  "layer_map": {ref.lm_head: port.lm_head}}
        which = "align's fp32 tolerance" if tolerance == TOLERANCE else "NOT align's fp32 tolerance: --atol/--rtol"
        notes += [
            ("models wrapped to return (loss, logits): paddle.utils.flatten does not open the port's output "
             "dataclass, so the root comparison would see no paddle tensor"),
            "loss_fn = the model's own loss on both sides (align's backward seed); PaDiff compares the losses",
            ("layer_map {lm_head: lm_head}: PaDiff transposes every class named Linear, and the port's lm_head is a "
             "paddle.compat.nn.Linear ([out, in], tied to embed_tokens); mapped, it is compared by its output and "
             "its tied weight's gradient through embed_tokens"),
            "auto_weights=False: align's weights, loaded and verified bit-exact before the run",
            (f"compare_mode strict, atol {tolerance['atol']:g}, rtol {tolerance['rtol']:g} ({which}; PaDiff's "
             "default compares the two tensors' means, atol 0, rtol 1e-7)"),
        ]
        record["tolerance"] = tolerance
    with open(log_path, "a") as log, contextlib.redirect_stdout(log):
        t, c = time.perf_counter(), time.process_time()
        try:
            ok = auto_diff(layer, module, (p_in, t_in), **kwargs)
            record["padiff_verdict"] = "pass" if ok else "fail"
        except Exception as e:  # noqa: BLE001 - a crash is a result here
            record["padiff_verdict"] = "crash"
            record["padiff_message"] = f"{type(e).__name__}: {e}"[:2000]
        record["seconds"] = time.perf_counter() - t
        record["cpu_seconds"] = time.process_time() - c
    record["peak_rss_mb"] = hwm_mb()
    record["load_avg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # this process's start and end
    record["ratio"] = record["seconds"] / record["bare_seconds"]
    record["cpu_ratio"] = record["cpu_seconds"] / record["bare_cpu_seconds"]
    # What PaDiff said, without its options dump and call stacks.
    said = [line.strip() for line in log_path.read_text().splitlines()
            if line.startswith("[AutoDiff]") or SAID.match(line)]
    record["padiff_log"] = str(log_path)
    record["padiff_said"] = [line for line in said if "Your options" not in line][:40]
    if record["padiff_verdict"] == "fail":
        record["padiff_message"] = " | ".join(line.removeprefix("[AutoDiff]").strip() for line in said
                                              if "Your options" not in line and "Train Step" not in line)[:2000]
    diff_log = scratch / "diff_log"
    if diff_log.is_dir() and any(diff_log.iterdir()):
        # The per-parameter reports in full (capped); the model-structure dumps by name only.
        record["padiff_diff_log"] = {p.name: p.read_text()[:3000] if p.name.endswith("_diff.log") else str(p)
                                     for p in sorted(diff_log.iterdir())}
    return record


def run_child(config: str, mode: str, raw: bool, bug: bool, tolerance: dict) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix=f"padiff-{config}-{mode}-"))
    env = {**os.environ, "PADIFF_API_CHECK": MODES[mode][0]}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", config, mode, str(scratch)]
    cmd += (["--raw"] if raw else []) + (["--bug"] if bug else [])
    cmd += ["--atol", repr(tolerance["atol"]), "--rtol", repr(tolerance["rtol"])]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = out.stdout.strip().splitlines()
    try:
        record = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        # The process itself died (not an exception auto_diff raised, which the child records).
        return {"config": CONFIGS[config][0], "mode": mode, "raw": raw, "padiff_verdict": "crash",
                "padiff_message": f"process exited {out.returncode}: {out.stderr[-2000:]}", "notes": [],
                "padiff_log": str(scratch / "padiff.log")}
    if record.get("padiff_verdict") == "crash":
        return record  # its log, left in the scratch directory, is the evidence
    # What PaDiff said and its diff reports are in the record: the scratch directory goes.
    record.pop("padiff_log", None)
    shutil.rmtree(scratch, ignore_errors=True)
    return record


def summarize(runs: list[dict]) -> dict:
    """One row from repeated fresh processes: the fastest of each timing (the least disturbed
    by other load on the machine), the largest peak RSS, every sample kept."""
    row = dict(runs[0])
    timed = [r for r in runs if r.get("seconds") is not None]
    if len(runs) > 1 and timed:
        row["seconds"] = min(r["seconds"] for r in timed)
        row["bare_seconds"] = min(r["bare_seconds"] for r in timed)
        row["ratio"] = row["seconds"] / row["bare_seconds"]
        row["cpu_seconds"] = min(r["cpu_seconds"] for r in timed)
        row["bare_cpu_seconds"] = min(r["bare_cpu_seconds"] for r in timed)
        row["cpu_ratio"] = row["cpu_seconds"] / row["bare_cpu_seconds"]
        row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in timed)
        row["bare_peak_rss_mb"] = max(r["bare_peak_rss_mb"] for r in timed)
        keep = ("seconds", "bare_seconds", "bare_samples", "cpu_seconds", "bare_cpu_seconds", "peak_rss_mb",
                "bare_peak_rss_mb", "padiff_verdict", "load_avg_1m")
        row["samples"] = [{k: r.get(k) for k in keep} for r in runs]
        row.pop("bare_samples", None)  # the first process's; each sample keeps its own
        if len({r.get("padiff_verdict") for r in runs}) > 1:
            row["notes"] = row.get("notes", []) + ["the verdict differed between repeats: see samples"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), action="append")
    parser.add_argument("--mode", choices=sorted(MODES), action="append")
    parser.add_argument("--raw", action="store_true", help="PaDiff's defaults, no accommodation")
    parser.add_argument("--bug", action="store_true", help="a real bug in the port (a norm weight + 1): "
                        "does PaDiff find and localise it? (not a timing run)")
    parser.add_argument("--atol", type=float, default=TOLERANCE["atol"], help="PaDiff's atol (default: align's)")
    parser.add_argument("--rtol", type=float, default=TOLERANCE["rtol"], help="PaDiff's rtol (default: align's)")
    parser.add_argument("--repeat", type=int, default=1, help="fresh processes per run; the fastest counts")
    parser.add_argument("--out", type=Path, default=RESULTS / "padiff.json")
    parser.add_argument("--child", nargs=3, metavar=("CONFIG", "MODE", "SCRATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    tolerance = {"atol": args.atol, "rtol": args.rtol}
    if args.child:
        config, mode, scratch = args.child
        record = child(config, mode, args.raw, Path(scratch), args.bug, tolerance)
        sys.stdout.write(json.dumps(record) + "\n")
        return
    rows, config_runs = [], {}
    for config in args.config or ["tiny", "mid"]:
        for mode in args.mode or list(MODES):
            runs = [run_child(config, mode, args.raw, args.bug, tolerance) for _ in range(args.repeat)]
            row = summarize(runs)
            rows.append(row)
            config_runs.setdefault(config, []).extend(runs)
            print(json.dumps({k: row.get(k) for k in ("config", "mode", "raw", "seconds", "bare_seconds", "ratio",
                                                      "cpu_seconds", "bare_cpu_seconds", "cpu_ratio", "peak_rss_mb",
                                                      "bare_peak_rss_mb", "padiff_verdict", "padiff_message")}),
                  flush=True)
    # The bare pass is the same work in every mode of a config: its fastest over all of that
    # config's processes is the steadier denominator on a shared machine.
    for row in rows:
        config = next(c for c, (name, *_) in CONFIGS.items() if name == row["config"])
        bare = [s for r in config_runs[config] for s in r.get("bare_samples", [])]
        if bare and row.get("seconds") is not None:
            row["bare_seconds_config"] = min(bare)
            row["ratio_config"] = row["seconds"] / min(bare)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
