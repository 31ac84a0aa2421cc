"""The audio family: references from the audio packages (auraloss' losses are named in
align.toml by their own class). What lives here is what they need beyond that:
- openai-whisper's Whisper with the loss that trains it (`whisper`), so that backward runs
  from a cross-entropy, not from a projection of the logits."""

from __future__ import annotations

from typing import Any


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
