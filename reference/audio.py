"""The audio family: references from the audio packages (auraloss' losses are named in
align.toml by their own class). What lives here is what they need beyond that:
- openai-whisper's Whisper with the loss that trains it (`whisper`), so that backward runs
  from a cross-entropy, not from a projection of the logits;
- its input, a log-mel spectrogram as long as the model's audio context (`log_mel`)."""

from __future__ import annotations

from typing import Any

import numpy as np


def whisper(**dims: Any) -> Any:
    """openai-whisper's `whisper.model.Whisper` (a reference builder: its module and tensor
    names unchanged) from ModelDimensions' values, whose forward also takes `labels` and
    returns the logits and the next-token cross-entropy over the labels that are not -100."""
    import torch
    import torch.nn.functional as F
    from whisper.model import ModelDimensions, Whisper

    class WithLoss(Whisper):
        def forward(self, mel, tokens, labels):
            logits = super().forward(mel, tokens)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
            return {"logits": logits, "loss": loss}

    model = WithLoss(ModelDimensions(**dims))
    # torch.empty: the decoder's positions are whatever memory held (NaN, once a process has
    # run a while) until a checkpoint overwrites them; zeros, before the registry's init noise
    torch.nn.init.zeros_(model.decoder.positional_embedding)
    return model


def log_mel(ctx: Any, batch: int) -> np.ndarray:
    """A (batch, n_mels, 2 x n_audio_ctx) log-mel spectrogram (the encoder's second convolution
    halves the frames to its context): values of whisper's normalised log-mel scale, which
    lies in about [-1, 1.5]."""
    shape = (batch, ctx.config["n_mels"], 2 * ctx.config["n_audio_ctx"])
    return np.clip(ctx.rng.normal(0.25, 0.5, size=shape), -1.0, 1.5).astype(np.float32)
