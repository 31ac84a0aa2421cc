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

from common import full_and_gate

MODELS = {("whisper", "base"): "Whisper base (6 + 6 layers, width 512, 1500 audio frames)"}


def main() -> None:
    full_and_gate(__doc__, MODELS, "model (batch 2)", "audio")


if __name__ == "__main__":
    main()
