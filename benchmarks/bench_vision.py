"""Vision ports at their real widths: ViT-B/16 (against transformers' and timm's) and Swin-T at
224 x 224 (the registry's `b16` and `t` configs, seeded random weights, a batch of 2 images with labels), each on the full
path (`align run`) and the gate's (`--fast`), in fresh processes.

    .venv/bin/python benchmarks/bench_vision.py [--repeat 1]

Recorded: time, peak memory, the verdict, the literal figure (the comparison furthest from
1e-5), how many comparisons the float64 truth was consulted for, and the worst max abs error of
each run and direction. Too slow for CI.
"""

from __future__ import annotations

from common import full_and_gate

MODELS = {("vit", "b16"): "ViT-B/16 (12 layers, hidden 768, 197 tokens)",
          ("vit-timm", "b16"): "ViT-B/16 against timm's (fused qkv split by rule)",
          ("swin", "t"): "Swin-T (depths 2-2-6-2, embed 96, window 7)"}


def main() -> None:
    full_and_gate(__doc__, MODELS, "model (224 x 224, batch 2)", "vision")


if __name__ == "__main__":
    main()
