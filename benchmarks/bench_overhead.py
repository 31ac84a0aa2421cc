"""Alignment overhead: `align run` against a bare forward + backward of both models, one run.

    .venv/bin/python benchmarks/bench_overhead.py

For each config (the tiny Gemma2, and a mid-size one: 8 layers, hidden 512, 256 tokens):
- bare: the reference and the port, weights already loaded, forward + backward once each
  with no hooks (after one warm-up), on the same inputs and threads;
- align: the whole in-process `align_model` (fp32: build, weight mapping, hooked runs of both,
  the observer runs, teacher-forced replay of every module, comparison), timed end to end.
The ratio is align / bare. Peak RSS is each phase's own (VmHWM of a fresh process).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

MID = {"vocab_size": 256, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8,
       "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "query_pre_attn_scalar": 64,
       "sliding_window": 128, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
       "tie_word_embeddings": True, "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "pad_token_id": 0,
       "use_cache": False, "attn_implementation": "eager"}

CHILD = r"""
import dataclasses, json, sys, time
HWM = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
from align import build
from align.spec import load_registry
from align.run import align_model, _load_weights, _seed
from align import weights as W
from align.paddle_side import PaddleSide
from align.torch_side import TorchSide
mode, config, seq_len = sys.argv[1], sys.argv[2], int(sys.argv[3])
spec = load_registry("align.toml").get("gemma2")
spec = dataclasses.replace(spec, inputs=dataclasses.replace(spec.inputs, seq_len=seq_len))
if mode == "align":
    t = time.perf_counter()
    report = align_model(spec, config, ("float32",))
    print(json.dumps({"seconds": time.perf_counter() - t, "rss_mb": HWM(), "verdict": report.verdict}))
else:
    ts, ps = TorchSide(), PaddleSide()
    cfg = build.reference_config(spec, config)
    ref, port = build.build_reference(spec, cfg), build.build_port(spec, cfg)
    _load_weights(W.load_rules(spec.weights_file), {k: ts.record(v).data for k, v in ref.state_dict().items()},
                  port, ps, cfg.to_dict())
    inputs = build.make_inputs(spec, cfg)
    def once(fw, model):
        fw.clear_grads(model)
        out = model(**{k: fw.tensor(a, False) for k, a in inputs.items()})
        fw.backward(_seed(fw, spec)(out))
    for fw, model in ((ts, ref), (ps, port)):
        once(fw, model)  # warm-up
    t = time.perf_counter()
    for fw, model in ((ts, ref), (ps, port)):
        once(fw, model)
    print(json.dumps({"seconds": time.perf_counter() - t, "rss_mb": HWM()}))
"""


def child(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    mid = ROOT / "benchmarks" / "results" / "gemma2-mid.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    mid.write_text(json.dumps(MID))
    rows = []
    for name, config, seq in (("tiny Gemma2 (4 layers, hidden 64, 16 tokens)", "tiny", 16),
                              ("mid Gemma2 (8 layers, hidden 512, 256 tokens)", str(mid), 256)):
        bare, aligned = child("bare", config, str(seq)), child("align", config, str(seq))
        rows.append({"config": name, "bare_s": round(bare["seconds"], 3), "align_s": round(aligned["seconds"], 2),
                     "ratio": round(aligned["seconds"] / bare["seconds"], 1), "bare_rss_mb": round(bare["rss_mb"]),
                     "align_rss_mb": round(aligned["rss_mb"]),
                     "rss_ratio": round(aligned["rss_mb"] / bare["rss_mb"], 2), "verdict": aligned["verdict"]})
    (RESULTS / "overhead.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = "\n".join(
        ["| config | bare fwd+bwd, both | `align run` (fp32, both modes) | ratio | peak RSS bare | peak RSS align | ratio |",
         "|---|---|---|---|---|---|---|"]
        + [f"| {r['config']} | {r['bare_s']} s | {r['align_s']} s | {r['ratio']}x | {r['bare_rss_mb']} MB | "
           f"{r['align_rss_mb']} MB | {r['rss_ratio']}x |" for r in rows])
    print(table)
    readme = ROOT / "benchmarks" / "README.md"
    text = readme.read_text()
    begin, end = "<!-- overhead:begin -->", "<!-- overhead:end -->"
    if begin in text:
        readme.write_text(text[: text.index(begin) + len(begin)] + "\n" + table + "\n" + text[text.index(end):])


if __name__ == "__main__":
    main()
