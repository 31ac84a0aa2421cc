"""Where the gate path's time goes, part by part, and the floor under it.

    .venv/bin/python benchmarks/bench_floor.py [--configs tiny,mid] [--rounds 60,3]

In one process, on the overhead benchmark's models and inputs (common.CONFIGS), each part
is timed in turn, round after round, and the table shows each part's median over the
rounds after the first (warm: first-pass costs are bench_overhead.py's business):
- bare: one forward + backward of each model, no hooks;
- hooks only: the same under align's hooks (`capture.hooked`) with a sink that does nothing;
- reference recorded: `capture.run_and_record`, the gate path's reference half;
- port forced, judging nothing: `force.force` with a judge that ignores what it is shown:
  every module teacher-forced (the reference's tensors swapped in, each stretch's backward
  seeded), with no comparison made;
- the same, one backward at the end: every stretch's backward in one call after the forward
  (what force.eager_or_once falls back to) instead of one call per stretch as it returns;
- port forced: the same with the Collector the gate path uses (the gate's port half).
"Floor" is reference recorded + port forced judging nothing: what the gate path costs
before any comparison. Its ratio to the bare pair says what comparing faster cannot fix.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

from common import CONFIGS, RESULTS, bench_spec, update_readme

PARTS = ("torch bare", "paddle bare", "torch hooks only", "paddle hooks only", "reference recorded",
         "port forced, judging nothing", "the same, one backward at the end", "port forced")


class _Nothing:
    """A sink and a judge at once, doing nothing with what it is shown."""

    def enter(self, *args):
        return None

    def exit(self, call, module, args, output, caller):
        return output

    def compare(self, *args):
        pass

    def fail(self, *args):
        pass

    def clear(self):
        pass


def measure(key: str, rounds: int) -> dict:
    from align import builders
    from align import weights as W
    from align.builders.backward import backward_seed
    from align.capture.force import Forcer, force
    from align.capture.hooks import hooked, run_and_record
    from align.capture.paddle_side import PaddleSide
    from align.capture.torch_side import TorchSide
    from align.compare.judges import Collector
    from align.compare.results import Tolerances
    from align.core.judged import as_reference
    from align.weights.loader import load_weights

    spec, config = bench_spec(key)
    ts, ps = TorchSide(), PaddleSide()
    cfg = builders.reference_config(spec, config)
    ref, port = builders.build_reference(spec, cfg), builders.build_port(spec, cfg)
    wmap = load_weights(W.load_rules(spec.weights_file), {k: ts.record(v).data for k, v in ref.state_dict().items()},
                         port, ps, builders.values_of(cfg))
    inputs = builders.make_inputs(spec, builders.values_of(cfg))

    def fresh(fw):
        return {k: fw.tensor(a, False) for k, a in inputs.items()}

    def plain(fw, model, sink=None):
        def run():
            fw.clear_grads(model)
            if sink is None:
                fw.backward(backward_seed(fw, spec)(model(**fresh(fw))))
                return
            with hooked(fw, model, sink):
                fw.backward(backward_seed(fw, spec)(model(**fresh(fw))))
        return run

    trace = run_and_record(ts, ref, fresh(ts), backward_seed(ts, spec), keep_inputs=True)
    to_ref = {n: n for n in trace.calls}  # gemma2's port keeps HF's module names
    tolerances = Tolerances(spec.tolerance, spec.overrides)

    judges: list[Collector] = []

    def to_reference(grads):  # the port's parameter gradients as the reference stores them
        return as_reference(grads, wmap)

    def forced(make_judge):
        def run():
            judges[:] = [make_judge()]
            force(ps, port, fresh(ps), trace.calls, to_ref, judges[0], trace.param_grads, to_reference)
        return run

    def once_at_end():
        forcer = Forcer(ps, trace.calls, to_ref, _Nothing(), eager=False)
        ps.clear_grads(port)
        with hooked(ps, port, forcer):
            port(**fresh(ps))
        forcer.backward(port, trace.param_grads, to_reference)
        forcer.leaves = {}

    parts: dict[str, Callable[[], None]] = {
        "torch bare": plain(ts, ref), "paddle bare": plain(ps, port),
        "torch hooks only": plain(ts, ref, _Nothing()), "paddle hooks only": plain(ps, port, _Nothing()),
        "reference recorded": lambda: run_and_record(ts, ref, fresh(ts), backward_seed(ts, spec), keep_inputs=True),
        "port forced, judging nothing": forced(_Nothing), "the same, one backward at the end": once_at_end,
        "port forced": forced(lambda: Collector(tolerances)),
    }
    samples: dict[str, list[float]] = {p: [] for p in PARTS}
    for _ in range(rounds):
        for part in PARTS:
            t = time.perf_counter()
            parts[part]()
            samples[part].append(time.perf_counter() - t)
    # The last part timed is the gate's forced pass: what its judge saw shows it compared.
    seen = [m for found in judges[0].found.values() for _, m in found]
    if not seen or any(not m.passed for m in seen):  # a failing comparison takes a shorter path
        sys.exit(f"bench_floor: the forced pass of {key} did not pass all {len(seen)} comparisons")
    med = {p: statistics.median(s[1:] if len(s) > 1 else s) * 1000 for p, s in samples.items()}
    bare = med["torch bare"] + med["paddle bare"]
    floor = med["reference recorded"] + med["port forced, judging nothing"]
    gate = med["reference recorded"] + med["port forced"]
    return {"config": CONFIGS[key][0], "rounds": rounds, "median_ms": {p: round(v, 2) for p, v in med.items()},
            "samples_ms": {p: [round(x * 1000, 2) for x in s] for p, s in samples.items()},
            "comparisons": len(seen), "bare_ms": round(bare, 2), "floor_ms": round(floor, 2), "gate_ms": round(gate, 2),
            "floor_ratio": round(floor / bare, 2), "gate_ratio": round(gate / bare, 2)}


def render(rows: list[dict]) -> str:
    lines = ["| config | " + " | ".join(PARTS) + " | floor / bare | gate parts / bare |",
             "|---|" + "---|" * (len(PARTS) + 2)]
    for r in rows:
        m = r["median_ms"]
        lines.append(f"| {r['config']} ({r['rounds']} rounds) | " + " | ".join(f"{m[p]:g} ms" for p in PARTS)
                     + f" | **{r['floor_ratio']}x** | {r['gate_ratio']}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="tiny,mid")
    ap.add_argument("--rounds", default="60,3", help="rounds per config, in the order of --configs")
    args = ap.parse_args()
    keys, rounds = args.configs.split(","), [int(n) for n in args.rounds.split(",")]
    if len(rounds) != len(keys):
        sys.exit(f"bench_floor: --rounds gives {len(rounds)} counts for {len(keys)} configs")
    rows = []
    for key, n in zip(keys, rounds):
        rows.append(measure(key, n))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "samples_ms"}))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "floor.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = render(rows)
    print(table)
    update_readme("floor", table)


if __name__ == "__main__":
    main()
