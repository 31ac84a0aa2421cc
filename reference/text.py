"""The text family: references are transformers' text models, named in align.toml by the
`class` and `config_class` shorthand and fed the token-id recipe, so what lives here is what
they need beyond that: outputs their users compute from the model's outputs, named in a
model's `inputs.derived` ("reference.text:mean_pooled") and compared like the model's own.

A derived output is a pure numpy function (outputs, inputs) -> array."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def mean_pooled(outputs: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """The sentence embedding sentence-transformers computes: the mean of the last hidden
    state over each sequence's real (mask = 1) tokens, in float64."""
    h = outputs["last_hidden_state"].astype(np.float64)  # (B, T, H)
    mask = inputs["attention_mask"].astype(np.float64)[..., None]  # (B, T, 1)
    return (h * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)

