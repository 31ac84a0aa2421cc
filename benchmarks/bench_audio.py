"""The audio family at its real widths: openai-whisper's base (74M parameters, 30 s of audio as
3000 log-mel frames, 51865 tokens, a batch of two 12-token texts) against ports/audio/whisper.py,
on the full path (`align run`) and the gate's (`--fast`), in fresh processes.

    .venv/bin/python benchmarks/bench_audio.py [--repeat 1]

Recorded: time, peak memory, the verdict, the literal figure (the comparison furthest from
1e-5), how many comparisons the float64 truth was consulted for (it runs through whisper's
float32 casts, float64 = "through-casts") and the worst max abs error of each run and
direction. Too slow for CI; with the float64 truth it needs more than this machine's 24 GB
(benchmarks/README.md says what was measured).
"""

from __future__ import annotations

import argparse
import json

from bench_vision import row
from common import RESULTS, align_in_process, update_readme

MODELS = {("whisper", "base"): "Whisper base (6 + 6 layers, width 512, 1500 audio frames)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1, help="processes per row; the fastest is kept")
    args = ap.parse_args()
    rows, results = [], []
    for (model, config), label in MODELS.items():
        for fast, path in ((False, "full (`align run`)"), (True, "gate (`--fast`)")):
            runs = [align_in_process(model, config, fast=fast) for _ in range(args.repeat)]
            best = min(runs, key=lambda r: r["seconds"])
            results.append({"model": model, "config": config, "path": path, **best})
            rows.append(row(label, path, best))
            print(rows[-1], flush=True)
    head = ("| model (batch 2) | path | time | verdict | modules | literal figure | truth consulted / passed by it | "
            "worst teacher-forced fwd / bwd | worst free-running fwd / bwd | peak RSS / private |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "audio.json").write_text(json.dumps(results, indent=1) + "\n")
    update_readme("audio", head + "\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
