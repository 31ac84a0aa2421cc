"""The model's inputs from its recipe, framework-free (numpy), seeded: identical bytes in both
frameworks. Also how the port takes them (labels shifted, extra keywords)."""

from __future__ import annotations

from typing import Any

import numpy as np

from align.capture.trace import Arr
from align.errors import ConfigError
from align.registry.spec import ModelSpec, resolve_path


def call_kwargs(spec: ModelSpec, module: str) -> dict[str, Any]:
    """The extra keywords the registry asks for when calling this (reference-named) module."""
    import fnmatch

    out: dict[str, Any] = {}
    for glob, kwargs in spec.port_call_kwargs.items():
        if fnmatch.fnmatchcase(module, glob):
            out.update(kwargs)
    return out


def inputs_for_port(values: dict[str, Any], spec: ModelSpec) -> dict[str, Any]:
    """The model inputs as the port takes them. With port.labels = "shifted", causal-LM labels
    are handed over already shifted (position t holds the label of t + 1), for ports whose
    loss does not shift them itself; both sides then score the same targets."""
    labels = values.get("labels")
    if spec.port_labels != "shifted" or not isinstance(labels, Arr):
        return values
    shifted = np.concatenate([labels.data[:, 1:], np.full_like(labels.data[:, :1], -100)], axis=1)
    return {**values, "labels": Arr(shifted, labels.dtype)}


IGNORE_INDEX = -100


MASKED_FRACTION = 0.3


def _tokenize(spec: ModelSpec, cfg: Any) -> dict[str, Arr]:
    """Real sentences through the model's own tokenizer (tokenizer.json), right-padded."""
    from tokenizers import Tokenizer

    r = spec.inputs
    path = resolve_path(r.tokenizer, spec.source)
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exceptions for missing or bad files
        raise ConfigError(spec.source, f"models.{spec.name}.inputs.tokenizer", f"cannot load {path}: {e}") from None
    tok.enable_truncation(r.seq_len)
    tok.enable_padding(length=r.seq_len, pad_id=getattr(cfg, "pad_token_id", 0) or 0)
    enc = tok.encode_batch(list(r.sentences))
    as_arr = lambda rows: Arr(np.array(rows, dtype=np.int64), "int64")  # noqa: E731
    return {"input_ids": as_arr([e.ids for e in enc]), "attention_mask": as_arr([e.attention_mask for e in enc]),
            "token_type_ids": as_arr([e.type_ids for e in enc])}


def make_inputs(spec: ModelSpec, cfg: Any) -> dict[str, Arr]:
    """Seeded token ids (or tokenized sentences), the padding mask and labels, framework-free."""
    r = spec.inputs
    if r.sentences:
        return _tokenize(spec, cfg)
    rng = np.random.default_rng(r.seed)
    pad = getattr(cfg, "pad_token_id", None) or 0
    ids = rng.integers(0, cfg.vocab_size, size=(r.batch, r.seq_len), dtype=np.int64)
    mask = np.ones((r.batch, r.seq_len), dtype=np.int64)
    for b, n in enumerate(r.left_pad):
        ids[b, :n] = pad
        mask[b, :n] = 0
    inputs = {"input_ids": Arr(ids, "int64"), "attention_mask": Arr(mask, "int64")}
    if r.labels == "causal_lm":
        inputs["labels"] = Arr(np.where(mask == 1, ids, IGNORE_INDEX).astype(np.int64), "int64")
    elif r.labels == "masked_lm":
        # About a third of the real tokens carry a label; the rest (and all padding) are ignored.
        chosen = (rng.random(ids.shape) < MASKED_FRACTION) & (mask == 1)
        inputs["labels"] = Arr(np.where(chosen, ids, IGNORE_INDEX).astype(np.int64), "int64")
    return inputs
