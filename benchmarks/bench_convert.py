"""Checkpoint conversion: throughput and peak RSS against the safetensors floor, in one run.

    .venv/bin/python benchmarks/bench_convert.py [--workdir DIR] [--shard-gb 1.0] [--keep]

1. Generates (seeded, streamed) a sharded random-weight checkpoint with the FULL Gemma2-2B
   shapes in bf16 (about 5.2 GB: every tensor of the model, so the strict rules apply).
2. Floor: in a fresh process, reads every shard and writes it back out with safetensors
   alone (safetensors.torch load_file + save_file, no mapping).
3. Ours: in a fresh process, `align weights convert SRC DST --model gemma2 --config full`.
4. Verifies the conversion, and prints and records GB/s, peak RSS and the ratio to the floor.

Peak RSS is each child process's own VmHWM (/proc/self/status). Both phases read a checkpoint the generator
has just written (warm page cache) and write without fsync, so they are measured alike.
Too slow for CI: this is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, ROOT, gemma2_full_shapes, update_readme, write_checkpoint

PY = sys.executable
# Peak RSS of THIS process: VmHWM resets at exec, where ru_maxrss carries over the parent's
# peak across fork + exec on Linux (it would report the generator's memory for every child).
HWM_EXPR = 'int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024'

CHILD_FLOOR = r"""
import json, sys, time
from pathlib import Path
HWM = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
from safetensors.torch import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
t = time.perf_counter(); n = 0
for shard in sorted(src.glob("*.safetensors")):
    tensors = load_file(str(shard))
    n += sum(v.numel() * v.element_size() for v in tensors.values())
    save_file(tensors, str(dst / shard.name), metadata={"format": "pt"})
    del tensors
print(json.dumps({"seconds": time.perf_counter() - t, "bytes": n,
                  "peak_rss_mb": HWM()}))
"""

CHILD_OURS = r"""
import json, sys, time
HWM = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
from align.cli import main
t = time.perf_counter()
code = main(["weights", "convert", sys.argv[1], sys.argv[2], "--model", "gemma2", "--config", "full", "--quiet"])
print(json.dumps({"code": code, "seconds": time.perf_counter() - t, "peak_rss_mb": HWM()}))
"""


def generate(dst: Path, shard_gb: float) -> dict:
    """A full-shape Gemma2-2B reference checkpoint, seeded random bf16, written tensor by tensor."""

    return write_checkpoint(dst, gemma2_full_shapes(), "BF16", shard_gb)


def child(code: str, *args: str) -> dict:
    out = subprocess.run([PY, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def baseline_rss() -> float:
    """What `align` costs before converting anything: imports, the registry, the lazy port."""
    code = ("import json; from align import builders; from align.registry import load_registry;"
            "s = load_registry('align.toml').get('gemma2'); c = builders.reference_config(s, 'full');"
            "builders.port_slots(s, c); builders.reference_shapes(s, c);"
            "print(json.dumps({'peak_rss_mb': " + HWM_EXPR + "}))")
    return child(code)["peak_rss_mb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/align-bench-convert"))
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = ap.parse_args()
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    src, floor_dst, ours_dst = args.workdir / "src", args.workdir / "floor", args.workdir / "ours"
    t = time.perf_counter()
    gen = generate(src, args.shard_gb)
    gen_s = time.perf_counter() - t
    print(f"generated {gen['bytes'] / 1e9:.2f} GB in {gen['shards']} shards in {gen_s:.0f} s "
          f"(largest shard {gen['largest_shard_mb']:.0f} MB, largest tensor {gen['largest_tensor_mb']:.0f} MB)")
    base = baseline_rss()
    floor = child(CHILD_FLOOR, str(src), str(floor_dst))
    ours = child(CHILD_OURS, str(src), str(ours_dst))
    if ours["code"] != 0:
        raise SystemExit("align weights convert failed")
    verify = subprocess.run([PY, "-m", "align", "weights", "verify", str(src), str(ours_dst), "--model", "gemma2",
                             "--config", "full"], capture_output=True, text=True, cwd=ROOT)
    gb = gen["bytes"] / 1e9
    result = {
        "checkpoint_gb": round(gb, 3), "shards": gen["shards"], "largest_shard_mb": round(gen["largest_shard_mb"]),
        "largest_tensor_mb": round(gen["largest_tensor_mb"]),
        "floor_gb_per_s": round(gb / floor["seconds"], 3), "ours_gb_per_s": round(gb / ours["seconds"], 3),
        "ratio_to_floor": round(ours["seconds"] / floor["seconds"], 2),
        "floor_peak_rss_mb": round(floor["peak_rss_mb"]), "ours_peak_rss_mb": round(ours["peak_rss_mb"]),
        "ours_baseline_rss_mb": round(base),
        "rss_bound_mb": round(gen["largest_shard_mb"] + gen["largest_tensor_mb"] + base),
        "verified": verify.returncode == 0,
        "machine": f"{os.cpu_count()} cores",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "convert.json").write_text(json.dumps(result, indent=1) + "\n")
    table = render(result)
    print(table)
    update_readme("convert", table)
    if not args.keep:
        shutil.rmtree(args.workdir)


def render(r: dict) -> str:
    return "\n".join([
        "| checkpoint | floor (safetensors load+save) | `align weights convert` | ratio | peak RSS floor | peak RSS ours | bound: shard + tensor + baseline | verified |",
        "|---|---|---|---|---|---|---|---|",
        f"| Gemma2-2B shapes, bf16, {r['checkpoint_gb']} GB in {r['shards']} shards | {r['floor_gb_per_s']} GB/s | "
        f"{r['ours_gb_per_s']} GB/s | {r['ratio_to_floor']}x | {r['floor_peak_rss_mb']} MB | {r['ours_peak_rss_mb']} MB | "
        f"{r['largest_shard_mb']} + {r['largest_tensor_mb']} + {r['ours_baseline_rss_mb']} = {r['rss_bound_mb']} MB | "
        f"{'bit-exact' if r['verified'] else 'FAILED'} |",
    ])


if __name__ == "__main__":
    main()
