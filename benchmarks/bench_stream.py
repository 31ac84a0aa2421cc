"""A full-size Gemma2-2B aligned forward and backward on this machine, one layer at a time.

    .venv/bin/python benchmarks/bench_stream.py [--workdir DIR] [--shard-gb 2.0] [--keep]

1. Generates (seeded, streamed, one tensor in memory at a time) a random-weight fp32
   checkpoint with the full google/gemma-2-2b configuration (about 10.5 GB).
2. In a fresh process: `align run gemma2 --config full --checkpoint DIR --stream-layers`.
3. Records the wall time, the child's peak RSS (VmHWM; and, sampled, its peak private memory,
   RssAnon, which leaves out memory-mapped file pages) and the verdict, next to what the two
   whole models would need: both sets of fp32 weights, and the same again for their gradients.
4. Then, in another fresh process, the same with `--only model.layers.N --only 'model.layers.N.*'`
   (N = --only-layer, 12 by default): re-checking one layer, as one does after fixing it. Its time is shown as
   a ratio to the whole run's, both measured in this run.
5. Then the same model cut to fewer decoder layers (--depths, 2 and 8 by default), each
   from a checkpoint of its own, streamed whole: what the depth costs in time and memory.
Too slow for CI: this is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import RESULTS, ROOT, gemma2_full_shapes, update_readme, write_checkpoint

CHILD = r"""
import json, sys, threading, time
status = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) / 1024
# VmHWM counts file pages too: the checkpoint's and the spilled gradients' memory maps, which
# the kernel takes back under pressure. RssAnon (private memory) has no high-water mark: sampled.
anon = [0.0]
def sample():
    while True:
        anon[0] = max(anon[0], status("RssAnon"))
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
from align.cli import main
t = time.perf_counter()
code = main(["run", "gemma2", "--config", sys.argv[3], "--checkpoint", sys.argv[1], "--stream-layers", "--quiet",
             "--out", sys.argv[2], *sys.argv[4:]])
print(json.dumps({"code": code, "seconds": time.perf_counter() - t, "peak_rss_mb": status("VmHWM"),
                  "peak_anon_mb": anon[0]}))
"""


def streamed(ckpt: Path, out: Path, config: str = "full", *extra: str) -> dict:
    """One streamed run of the checkpoint in a fresh process: time, peak RSS and what it judged."""
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(out), config, *extra], capture_output=True,
                          text=True, cwd=ROOT)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"the streamed run failed:\n{proc.stderr[-3000:]}")
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    report = json.loads((out / "report.json").read_text())
    [tf] = [r for r in report["runs"] if r["status"] == "ran"]
    worst = {d: max((layer[d]["max_abs"] for layer in tf["layers"] if layer[d]), default=0.0)
             for d in ("forward", "backward")}
    return {"layers": len(tf["layers"]), "param_grads": len(report["param_grads"]), "seconds": round(run["seconds"], 1),
            "peak_rss_mb": round(run["peak_rss_mb"]), "peak_anon_mb": round(run["peak_anon_mb"]),
            "verdict": report["verdict"], "worst_forward": worst["forward"], "worst_backward": worst["backward"],
            "culprits": report["culprits"], "only": report["only"]}


def checkpoint(path: Path, shapes: dict, shard_gb: float) -> None:
    if not (path / "model.safetensors.index.json").is_file():
        shutil.rmtree(path, ignore_errors=True)
        t = time.perf_counter()
        gen = write_checkpoint(path, shapes, "F32", shard_gb)
        print(f"generated {gen['bytes'] / 1e9:.2f} GB in {gen['shards']} shards in {time.perf_counter() - t:.0f} s")


def depth_files(workdir: Path, depth: int) -> tuple[Path, Path]:
    """Where the `depth`-layer cut of the 2B keeps its checkpoint and its config."""
    return workdir / f"gemma2-2b-fp32-{depth}-layers", workdir / f"gemma2-2b-{depth}-layers.json"


def shallower(depth: int, workdir: Path, shard_gb: float) -> dict:
    """The 2B's widths and vocabulary with only `depth` decoder layers: its own checkpoint and
    config, streamed whole, to show what the depth costs in memory and time."""
    import re

    from align.registry.load import load_registry

    shapes = {k: s for k, s in gemma2_full_shapes().items()
              if not (m := re.match(r"model\.layers\.(\d+)\.", k)) or int(m.group(1)) < depth}
    ckpt, config = depth_files(workdir, depth)
    checkpoint(ckpt, shapes, shard_gb)
    full = load_registry(ROOT / "align.toml").get("gemma2").configs["full"]
    config.write_text(json.dumps({**full, "num_hidden_layers": depth}))
    gb = sum(int(np.prod(s)) for s in shapes.values()) * 4 / 1e9
    return {"depth": depth, "checkpoint_gb": round(gb, 2), "both_models_with_grads_gb": round(4 * gb, 1),
            **streamed(ckpt, workdir / "report", str(config))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/align-bench-stream"))
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the generated checkpoint")
    ap.add_argument("--only-layer", type=int, default=12, help="the layer the --only run re-checks")
    ap.add_argument("--depths", default="2,8", help="also stream the 2B with only this many layers (comma-separated; "
                                                    "'' for none), each from a checkpoint of its own")
    args = ap.parse_args()
    ckpt, out = args.workdir / "gemma2-2b-fp32", args.workdir / "report"
    shapes = gemma2_full_shapes()
    weights_gb = sum(int(np.prod(s)) for s in shapes.values()) * 4 / 1e9
    checkpoint(ckpt, shapes, args.shard_gb)
    row = {"model": "Gemma2-2B (google/gemma-2-2b config), random fp32 weights", "checkpoint_gb": round(weights_gb, 2),
           "both_models_weights_gb": round(2 * weights_gb, 1), "both_models_with_grads_gb": round(4 * weights_gb, 1),
           "whole": streamed(ckpt, out), "one_layer": streamed(ckpt, out, "full", "--only",
                                                               f"model.layers.{args.only_layer}",
                                                               "--only", f"model.layers.{args.only_layer}.*")}
    row["one_layer"]["ratio_to_whole"] = round(row["one_layer"]["seconds"] / row["whole"]["seconds"], 2)
    depths = [int(d) for d in args.depths.split(",") if d.strip()]
    row["depths"] = [shallower(d, args.workdir, args.shard_gb) for d in depths]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "stream.json").write_text(json.dumps(row, indent=1) + "\n")
    lines = [("| model | checkpoint | run | modules judged | wall time | peak RSS (of it private) | both whole models: "
              "weights / with grads | verdict | worst fwd / bwd (teacher-forced) |"), "|---|---|---|---|---|---|---|---|---|"]
    for what, r in (("whole model", row["whole"]),
                    (f"one layer again (`--only model.layers.{args.only_layer} --only 'model.layers.{args.only_layer}.*'`)",
                     row["one_layer"])):
        time_s = f"{r['seconds'] / 60:.1f} min" + (f" ({r['ratio_to_whole']}x the whole)" if "ratio_to_whole" in r else "")
        lines.append(f"| {row['model']} | {row['checkpoint_gb']} GB fp32 | {what} | {r['layers']} | {time_s} | "
                     f"{r['peak_rss_mb'] / 1024:.1f} GB ({r['peak_anon_mb'] / 1024:.1f} GB) | "
                     f"{row['both_models_weights_gb']} GB / "
                     f"{row['both_models_with_grads_gb']} GB | {r['verdict']} | "
                     f"{r['worst_forward']:.2e} / {r['worst_backward']:.2e} |")
    if row["depths"]:
        lines += ["", "| decoder layers (2B widths, 256000 vocabulary) | checkpoint | both whole models with grads "
                  "| modules judged | wall time | peak RSS (of it private) | verdict |", "|---|---|---|---|---|---|---|"]
        for r in [*row["depths"], {"depth": 26, "checkpoint_gb": row["checkpoint_gb"],
                                   "both_models_with_grads_gb": row["both_models_with_grads_gb"], **row["whole"]}]:
            lines.append(f"| {r['depth']} | {r['checkpoint_gb']} GB | {r['both_models_with_grads_gb']} GB | {r['layers']} | "
                         f"{r['seconds'] / 60:.1f} min | {r['peak_rss_mb'] / 1024:.1f} GB "
                         f"({r['peak_anon_mb'] / 1024:.1f} GB) | {r['verdict']} |")
    table = "\n".join(lines)
    print(table)
    update_readme("stream", table)
    if not args.keep:
        shutil.rmtree(ckpt)
        for d in depths:
            ckpt_d, config_d = depth_files(args.workdir, d)
            shutil.rmtree(ckpt_d)
            config_d.unlink()


if __name__ == "__main__":
    main()
