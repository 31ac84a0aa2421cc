"""What the benchmarks share: one alignment in a fresh process with its time and memory,
seeded random-weight checkpoints with a model's full shapes (written tensor by tensor,
nothing held beyond one tensor), and their README tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# One alignment, timed, in the process this runs in (a fresh one per call of align_in_process).
_WORKER = r"""
import dataclasses, json, sys, threading, time
from pathlib import Path
status = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) / 1024
# VmHWM counts the memory-mapped checkpoint's pages too, which the kernel takes back under
# pressure; private memory (RssAnon) has no high-water mark: sampled.
anon = [0.0]
def sample():
    while True:
        anon[0] = max(anon[0], status("RssAnon"))
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
job = json.loads(sys.argv[1])
from align.core.port import align_model
from align.core.streamed import align_streamed
from align.registry.load import load_registry
spec = load_registry(Path(job["registry"])).get(job["model"])
if not job["truth"]:
    spec = dataclasses.replace(spec, noise_floor=None)
t = time.perf_counter()
if job["checkpoint"]:
    report = align_streamed(spec, job["config"], Path(job["checkpoint"]))
else:
    report = align_model(spec, job["config"], dtypes=("float32",), fast=job["fast"])
seconds = time.perf_counter() - t
r = report.to_dict()
judged = r["judged_by"]
ran = [run for run in r["runs"] if run["status"] == "ran"]
consulted = sum(1 for run in ran for layer in run["layers"]
                for m in (layer["forward"], layer["backward"]) if m and m.get("truth_error") is not None)
consulted += sum(1 for k in ("outputs", "param_grads", "input_grads") for t in r[k] if t.get("truth_error") is not None)
worst = {f"{run['mode']}_{d}": max((layer[d]["max_abs"] for layer in run["layers"] if layer[d]), default=None)
         for run in ran for d in ("forward", "backward")}
print(json.dumps({"seconds": seconds, "peak_rss_mb": status("VmHWM"), "peak_anon_mb": anon[0], "verdict": r["verdict"],
                  "consulted": consulted, "passed_by_truth": len(judged["passed_by_truth"]),
                  "literal": judged["literal"], "worst_max_abs": worst,
                  "modules": len(ran[0]["layers"]) if ran else 0}))
"""


def align_in_process(model: str, config: str, truth: bool = True, fast: bool = False,
                     checkpoint: Path | None = None) -> dict:
    """Align `model` at `config` (fp32) in a fresh process: its time, peak memory, verdict,
    literal figure, how many comparisons consulted the float64 truth, and the worst max abs
    error of each run and direction. `truth=False`: judged by the literal rule alone."""
    job = {"registry": str(ROOT / "align.toml"), "model": model, "config": config, "truth": truth, "fast": fast,
           "checkpoint": str(checkpoint) if checkpoint else None}
    proc = subprocess.run([sys.executable, "-c", _WORKER, json.dumps(job)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{model} {config} (truth={truth}, fast={fast}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# The overhead benchmark's configs, which padiff_run.py builds the same way: name, what
# `align_model` takes as the config (a registry config, or a JSON file of values), tokens
# per sample, and the std of the seeded weights (None: the registry's).
MID = {"vocab_size": 256, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8,
       "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "query_pre_attn_scalar": 64,
       "sliding_window": 128, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
       "tie_word_embeddings": True, "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "pad_token_id": 0,
       "use_cache": False, "attn_implementation": "eager"}
MID_JSON = RESULTS / "gemma2-mid.json"
# The registry draws gemma2's weights with std 0.1, large on purpose: on the tiny config a
# small bug (a dropped "1 +" in a norm) must show. On mid, whose sums run over 2048 terms,
# fp32 rounding alone then reaches 3e-5 and the correct port fails align's 1e-5 (as it
# fails PaDiff's). Mid draws them with 0.02, Gemma2's own initializer_range.
CONFIGS = {"tiny": ("tiny Gemma2 (4 layers, hidden 64, 16 tokens)", "tiny", 16, None),
           "mid": ("mid Gemma2 (8 layers, hidden 512, 256 tokens)", str(MID_JSON), 256, 0.02)}


def bench_spec(key: str):
    """The gemma2 ModelSpec and config argument of one benchmark config."""
    import dataclasses

    from align.registry.load import load_registry

    _, config, seq_len, std = CONFIGS[key]
    if config == str(MID_JSON):
        MID_JSON.parent.mkdir(parents=True, exist_ok=True)
        MID_JSON.write_text(json.dumps(MID))
    spec = load_registry(ROOT / "align.toml").get("gemma2")
    spec = dataclasses.replace(spec, inputs=spec.inputs.with_params("input_ids", seq_len=seq_len))
    if std is not None:
        spec = dataclasses.replace(spec, init=dataclasses.replace(spec.init, std=std))
    return spec, config


def update_readme(section: str, table: str) -> None:
    """Replace the table between `<!-- section:begin -->` and `<!-- section:end -->`."""
    readme = ROOT / "benchmarks" / "README.md"
    text = readme.read_text()
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    if begin in text:
        readme.write_text(text[: text.index(begin) + len(begin)] + "\n" + table + "\n" + text[text.index(end):])


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.2g}"


def row(label: str, path: str, r: dict) -> str:
    lit, worst = r["literal"], r["worst_max_abs"]
    figure = f"{lit['needed_atol']:.2g} ({'meets' if lit['met'] else 'beyond'} 1e-5)"
    return (f"| {label} | {path} | {r['seconds']:.1f} s | {r['verdict']} | {r['modules']} | {figure} | "
            f"{r['consulted']} / {r['passed_by_truth']} | {_g(worst.get('teacher_forced_forward'))} / "
            f"{_g(worst.get('teacher_forced_backward'))} | {_g(worst.get('free_running_forward'))} / "
            f"{_g(worst.get('free_running_backward'))} | {r['peak_rss_mb']:.0f} / {r['peak_anon_mb']:.0f} MB |")


def full_and_gate(description: str, models: dict[tuple[str, str], str], first_column: str, section: str) -> None:
    """Align each (model, config) on the full path (`align run`) and the gate's (`--fast`), in
    fresh processes (the fastest of --repeat kept): results/<section>.json, and the table
    between the README's <!-- section --> markers."""
    import argparse

    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1, help="processes per row; the fastest is kept")
    args = ap.parse_args()
    rows, results = [], []
    for (model, config), label in models.items():
        for fast, path in ((False, "full (`align run`)"), (True, "gate (`--fast`)")):
            runs = [align_in_process(model, config, fast=fast) for _ in range(args.repeat)]
            best = min(runs, key=lambda r: r["seconds"])
            results.append({"model": model, "config": config, "path": path, **best})
            rows.append(row(label, path, best))
            print(rows[-1], flush=True)
    head = (f"| {first_column} | path | time | verdict | modules | literal figure | truth consulted / passed by it | "
            "worst teacher-forced fwd / bwd | worst free-running fwd / bwd | peak RSS / private |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{section}.json").write_text(json.dumps(results, indent=1) + "\n")
    update_readme(section, head + "\n" + "\n".join(rows))


def gemma2_full_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor google/gemma-2-2b stores (the tied head is not stored)."""
    from align import builders
    from align.registry.load import load_registry

    spec = load_registry(ROOT / "align.toml").get("gemma2")
    shapes = builders.reference_shapes(spec, builders.reference_config(spec, "full"))
    shapes.pop("lm_head.weight")
    return shapes


def write_checkpoint(dst: Path, shapes: dict[str, tuple[int, ...]], dtype: str, shard_gb: float, seed: int = 0) -> dict:
    """A sharded safetensors checkpoint (with model.safetensors.index.json) of seeded random
    values: "BF16", drawn as bit patterns of normal values in about +-[1e-3, 0.06]; or "F32",
    N(0, 0.02) for matrices (the configs' initializer_range) and N(0, 0.1) for vectors (norm
    weights around Gemma's 1 + w, so a dropped "1 +" shows)."""
    from align.weights.safetensors_io import Planned, write_streaming

    rng = np.random.default_rng(seed)
    width = {"BF16": 2, "F32": 4}[dtype]

    def draw(shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape))
        if dtype == "F32":
            std = np.float32(0.02 if len(shape) > 1 else 0.1)
            return (rng.standard_normal(n, dtype=np.float32) * std).reshape(shape)
        sign = rng.integers(0, 2, n, dtype=np.uint16) << np.uint16(15)
        exp = rng.integers(117, 123, n, dtype=np.uint16) << np.uint16(7)
        mant = rng.integers(0, 128, n, dtype=np.uint16)
        return (sign | exp | mant).reshape(shape)

    dst.mkdir(parents=True)
    shards, current, size, limit = [], [], 0, shard_gb * 1e9
    for key, shape in shapes.items():
        nbytes = int(np.prod(shape)) * width
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append((key, shape))
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        planned = [Planned(k, dtype, tuple(s), lambda s=s: draw(s)) for k, s in shard]
        total += write_streaming(dst / name, planned, {"format": "pt"})
        weight_map.update({k: name for k, _ in shard})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    largest = max(int(np.prod(s)) * width for s in shapes.values())
    sizes = [sum(int(np.prod(s)) * width for _, s in shard) for shard in shards]
    return {"bytes": total, "shards": len(shards), "largest_shard_mb": max(sizes) / 1e6, "largest_tensor_mb": largest / 1e6}
