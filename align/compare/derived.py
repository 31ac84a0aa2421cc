"""Outputs computed from a model's outputs and compared too: what users of the reference
actually consume (a sentence embedding pooled from hidden states)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def mean_pooled(outputs: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """The sentence embedding sentence-transformers computes: the mean of the last hidden
    state over each sequence's real (mask = 1) tokens, in float64."""
    h = outputs["last_hidden_state"].astype(np.float64)  # (B, T, H)
    mask = inputs["attention_mask"].astype(np.float64)[..., None]  # (B, T, 1)
    return (h * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)


DERIVED = {"mean_pooled": mean_pooled}
