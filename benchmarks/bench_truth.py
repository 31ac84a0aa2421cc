"""What the float64 truth costs: each run with the default judgement (the literal rule, then
the float64 truth where it fails) beside the same run judged by the literal rule alone
(float64 = false), in fresh processes taking turns.

    .venv/bin/python benchmarks/bench_truth.py [--configs tiny,mid,wide] [--repeat 2] [--stream]

- tiny, mid and wide are the registry's gemma2 configs (wide: Gemma2-2B's width, 2 layers),
  each on the full path (`align run`) and the gate's (`--fast`); the fastest of --repeat
  processes is kept.
- --stream: the full-size Gemma2-2B, streamed one layer at a time from a seeded random fp32
  checkpoint (bench_stream.py's; generated in --workdir, about 10.5 GB), once each way.
The truth is made only when a comparison fails the literal rule, so "consulted" says how many
comparisons needed it, and the extra time is what they cost. Too slow for CI.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import RESULTS, ROOT, align_in_process, gemma2_full_shapes, update_readme

LABELS = {"tiny": "tiny (hidden 64, 4 layers)", "mid": "mid (hidden 512, intermediate 2048, 4 layers)",
          "wide": "wide (Gemma2-2B's width: hidden 2304, intermediate 9216, 2 layers)",
          "full": "Gemma2-2B, streamed (26 layers, vocabulary 256000)"}


def one(config: str, truth: bool, fast: bool = False, checkpoint: Path | None = None) -> dict:
    return align_in_process("gemma2", config, truth=truth, fast=fast, checkpoint=checkpoint)


def fastest(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["seconds"])


def row(config: str, path: str, on: dict, off: dict) -> str:
    lit = on["literal"]
    figure = f"{lit['needed_atol']:.2g} ({'meets' if lit['met'] else 'beyond'} 1e-5)"
    return (f"| {LABELS[config]} | {path} | {off['seconds']:.2f} s, {off['verdict']} | {on['seconds']:.2f} s, "
            f"{on['verdict']} | **{on['seconds'] / off['seconds']:.2f}x** | {on['consulted']} | {on['passed_by_truth']} | "
            f"{figure} | {off['peak_rss_mb']:.0f} / {on['peak_rss_mb']:.0f} MB | "
            f"{off['peak_anon_mb']:.0f} / {on['peak_anon_mb']:.0f} MB |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="tiny,mid,wide")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--stream", action="store_true", help="also the streamed full-size Gemma2-2B")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/align-bench-stream"))
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--stream-repeat", type=int, default=1, choices=(1, 2))
    args = ap.parse_args()
    rows, results = [], []
    if args.configs == "none":
        args.configs = ""
    for config in [c for c in args.configs.split(",") if c]:
        for fast, path in ((False, "full (`align run`)"), (True, "gate (`--fast`)")):
            runs = {True: [], False: []}
            for _ in range(args.repeat):
                for truth in (False, True):  # taking turns
                    runs[truth].append(one(config, truth, fast))
            on, off = fastest(runs[True]), fastest(runs[False])
            results.append({"config": config, "path": path, "truth": on, "literal_only": off})
            rows.append(row(config, path, on, off))
            print(rows[-1], flush=True)
    if args.stream:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_stream import checkpoint

        ckpt = args.workdir / "gemma2-2b-fp32"
        if not (ckpt / "model.safetensors.index.json").exists():
            checkpoint(ckpt, gemma2_full_shapes(), args.shard_gb)
        runs = {True: [], False: []}
        for truth in (True, False, True, False)[: 2 * args.stream_repeat]:  # taking turns, the truth first
            runs[truth].append(one("full", truth, checkpoint=ckpt))
        on, off = fastest(runs[True]), fastest(runs[False])
        results.append({"config": "full", "path": "streamed", "truth": on, "literal_only": off})
        rows.append(row("full", "streamed (`--stream-layers`)", on, off))
        print(rows[-1], flush=True)
    head = ("| config | path | literal rule alone | with the float64 truth (default) | ratio | comparisons that "
            "consulted it | passed by it | literal figure | peak RSS (alone / with) | peak private (alone / with) |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "truth.json").write_text(json.dumps(results, indent=1) + "\n")
    update_readme("truth", head + "\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
