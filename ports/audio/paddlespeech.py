"""PaddleSpeech's own audio models as align ports: the model code is theirs (paddlespeech
1.5.0), only the config, the call and one construction-time shim are adapted.

paddlespeech pins an older numpy and pulls paddlenlp for its tokenizers, so these run in their
own environment (.venv-paddlespeech, `make venv-paddlespeech`), against a trace of the torch
reference.

What the adapters do, and nothing more:
- build each model from the reference config's values;
- compute the loss the reference computes (PaddleSpeech computes it outside the model): the
  same next-token cross-entropy as ports/audio/whisper.py (ports.common.causal_lm_loss);
- while a model is built, let paddle.nn.Conv1D, Conv2D and LayerNorm take their arguments in
  the order PaddleSpeech passes them (see `_paddle_2_positions`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict

import paddle
from paddlespeech.s2t.models.whisper import whisper as ps_whisper

from ports.audio.whisper import ModelDimensions, WhisperOutput
from ports.common import causal_lm_loss

# Paddle 3.3 made these layers' trailing arguments keyword-only; PaddleSpeech 1.5.0's
# paddlespeech.s2t.modules.align passes them by position: (how many positional arguments the
# layer still takes, the names of the ones PaddleSpeech passes after them, in its order).
_NOW_KEYWORD_ONLY = {
    paddle.nn.Conv1D: (7, ("padding_mode", "weight_attr", "bias_attr", "data_format")),
    paddle.nn.Conv2D: (7, ("padding_mode", "weight_attr", "bias_attr", "data_format")),
    paddle.nn.LayerNorm: (2, ("weight_attr", "bias_attr", "name")),
}


@contextmanager
def _paddle_2_positions() -> Iterator[None]:
    """While a PaddleSpeech model is built, paddle.nn.Conv1D, Conv2D and LayerNorm take the
    arguments Paddle 3.3 made keyword-only by position too, in Paddle 2's order (PaddleSpeech
    1.5.0 passes them so, which raises TypeError on Paddle 3.3.1). The layers built are
    Paddle's own, with the same arguments; nothing is changed once the model is built."""
    saved = {cls: cls.__init__ for cls in _NOW_KEYWORD_ONLY}

    def by_position(init, positional, late_names):
        def accept(self, *args, **kwargs):
            kwargs.update(zip(late_names, args[positional:]))
            init(self, *args[:positional], **kwargs)
        return accept

    try:
        for cls, (positional, late_names) in _NOW_KEYWORD_ONLY.items():
            cls.__init__ = by_position(saved[cls], positional, late_names)
        yield
    finally:
        for cls, init in saved.items():
            cls.__init__ = init


class Whisper(ps_whisper.Whisper):
    """PaddleSpeech's Whisper (paddlespeech.s2t.models.whisper) built from openai-whisper's
    ModelDimensions' values, with the next-token loss."""

    def __init__(self, dims: ModelDimensions):
        with _paddle_2_positions():
            super().__init__(ps_whisper.ModelDimensions(**asdict(dims)))

    def forward(self, mel, tokens, labels):
        logits = super().forward(mel, tokens)
        return WhisperOutput(logits, causal_lm_loss(logits, labels))


__all__ = ["ModelDimensions", "Whisper"]
