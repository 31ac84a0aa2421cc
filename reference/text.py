"""The text family: references are transformers' text models, named in align.toml by the
`class` and `config_class` shorthand and fed token ids (kind = "tokens"), so what lives here
is what they need beyond that:
- an input builder for real sentences through a model's own tokenizer (`tokenized`);
- outputs their users compute from the model's outputs, named in a model's `inputs.derived`
  ("reference.text:mean_pooled") and compared like the model's own: pure numpy functions
  (outputs, inputs) -> array."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def mean_pooled(outputs: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """The sentence embedding sentence-transformers computes: the mean of the last hidden
    state over each sequence's real (mask = 1) tokens, in float64."""
    h = outputs["last_hidden_state"].astype(np.float64)  # (B, T, H)
    mask = inputs["attention_mask"].astype(np.float64)[..., None]  # (B, T, 1)
    return (h * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)



def tokenized(ctx: Any, tokenizer: str, seq_len: int, sentences: list[str]) -> dict[str, np.ndarray]:
    """Real sentences through the model's own tokenizer (a tokenizer.json), truncated and
    right-padded to seq_len: input_ids, attention_mask and token_type_ids (an input builder,
    kind = "builder"; see align.builders.inputs)."""
    from tokenizers import Tokenizer

    path = ctx.path(tokenizer)
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exceptions for missing or bad files
        raise ctx.fail("sentences", f"cannot load the tokenizer {path}: {e}") from None
    if not sentences or not all(isinstance(s, str) for s in sentences):
        raise ctx.fail("sentences", "expected a non-empty list of strings")
    tok.enable_truncation(seq_len)
    tok.enable_padding(length=seq_len, pad_id=ctx.config.get("pad_token_id") or 0)
    enc = tok.encode_batch(list(sentences))
    return {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64)}
