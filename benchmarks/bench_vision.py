"""Vision ports at their real widths: ViT-B/16 (against transformers' and timm's) and Swin-T at
224 x 224 (the registry's `b16` and `t` configs, seeded random weights, a batch of 2 images with labels), each on the full
path (`align run`) and the gate's (`--fast`), in fresh processes.

    .venv/bin/python benchmarks/bench_vision.py [--repeat 1]

Recorded: time, peak memory, the verdict, the literal figure (the comparison furthest from
1e-5), how many comparisons the float64 truth was consulted for, and the worst max abs error of
each run and direction. Too slow for CI.
"""

from __future__ import annotations

import argparse
import json

from common import RESULTS, align_in_process, update_readme

MODELS = {("vit", "b16"): "ViT-B/16 (12 layers, hidden 768, 197 tokens)",
          ("vit-timm", "b16"): "ViT-B/16 against timm's (fused qkv split by rule)",
          ("swin", "t"): "Swin-T (depths 2-2-6-2, embed 96, window 7)"}


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.2g}"


def row(label: str, path: str, r: dict) -> str:
    lit, worst = r["literal"], r["worst_max_abs"]
    figure = f"{lit['needed_atol']:.2g} ({'meets' if lit['met'] else 'beyond'} 1e-5)"
    return (f"| {label} | {path} | {r['seconds']:.1f} s | {r['verdict']} | {r['modules']} | {figure} | "
            f"{r['consulted']} / {r['passed_by_truth']} | {_g(worst.get('teacher_forced_forward'))} / "
            f"{_g(worst.get('teacher_forced_backward'))} | {_g(worst.get('free_running_forward'))} / "
            f"{_g(worst.get('free_running_backward'))} | {r['peak_rss_mb']:.0f} / {r['peak_anon_mb']:.0f} MB |")


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
    head = ("| model (224 x 224, batch 2) | path | time | verdict | modules | literal figure | truth consulted / "
            "passed by it | worst teacher-forced fwd / bwd | worst free-running fwd / bwd | peak RSS / private |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vision.json").write_text(json.dumps(results, indent=1) + "\n")
    update_readme("vision", head + "\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
