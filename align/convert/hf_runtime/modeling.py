"""The model base class and layer bases that converted HF modeling files inherit from."""

from __future__ import annotations

import logging

import paddle

from align.convert.hf_runtime import initialization as init
from align.convert.hf_runtime.losses import LOSS_MAPPING
from align.convert.hf_runtime.nn import Embedding

_LINEARS = (paddle.compat.nn.Linear, paddle.nn.Linear)


class GradientCheckpointingLayer(paddle.nn.Layer):
    """HF's layer base that can checkpoint activations while training; here it only runs."""

    gradient_checkpointing = False


class GenerationMixin:
    """Generation is not part of an alignment; the name exists so converted classes define."""


class PreTrainedModel(paddle.nn.Layer):
    """What HF's PreTrainedModel does to a model's numbers: keep the config, pick the
    attention implementation, initialise weights, tie the ones `_tied_weights_keys` names,
    and pick the loss from the class name."""

    config_class = None
    base_model_prefix = ""
    _tied_weights_keys: dict[str, str] | list[str] | None = None

    def __init__(self, config, *args, **kwargs):
        super().__init__()
        # transformers defaults to sdpa where a model supports it; align pins references to
        # eager, and the runtime does not guess: no choice in the config means eager.
        if getattr(config, "_attn_implementation", None) is None:
            config._attn_implementation = "eager"
        self.config = config

    @classmethod
    def _from_config(cls, config, **kwargs):
        """A sub-model built from its part of a composite config (CLIP's text and vision towers)."""
        return cls(config, **kwargs)

    # --- initialisation and tying -------------------------------------------------------
    def post_init(self) -> None:
        with paddle.no_grad():
            for module in self.sublayers(include_self=True):
                self._init_weights(module)
        self.tie_weights()

    def _init_weights(self, module: paddle.nn.Layer) -> None:
        """HF's base init: normal(0, initializer_range) for linears and embeddings (pad row
        zero), ones and zeros for norms. Model classes extend it."""
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, _LINEARS):
            init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (Embedding, paddle.nn.Embedding)):
            init.normal_(module.weight, 0.0, std)
            pad = getattr(module, "padding_idx", None)
            if pad is not None:
                module.weight[pad] = 0.0
        elif isinstance(module, paddle.nn.LayerNorm):
            if module.weight is not None:
                init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)

    def _tie_pairs(self) -> list[tuple[str, str]]:
        keys = self._tied_weights_keys or {}
        if isinstance(keys, dict):
            return list(keys.items())
        # The older list form names the output embedding; its source is the input embedding.
        return [(k, f"{self.get_input_embeddings_path()}.weight") for k in keys]

    def get_input_embeddings_path(self) -> str:
        for name, layer in self.named_sublayers():
            if isinstance(layer, (Embedding, paddle.nn.Embedding)):
                return name
        raise AttributeError("no embedding layer")

    def tie_weights(self) -> None:
        """Make each tied target share its source's parameter (one tensor, as in torch)."""
        config = self.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if not getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)):
            return
        layers = dict(self.named_sublayers(include_self=True))
        params = dict(self.named_parameters())
        for target, source in self._tie_pairs():
            owner, _, attr = target.rpartition(".")
            if owner not in layers or source not in params:
                continue  # a tie for a head this class does not have
            setattr(layers[owner], attr, params[source])

    # --- loss -----------------------------------------------------------------------------
    @property
    def loss_function(self):
        name = type(self).__name__
        for key, fn in LOSS_MAPPING.items():
            if key in name:
                return fn
        raise NotImplementedError(f"{name}: no loss in align's runtime for this kind of head "
                                  f"(known: {', '.join(LOSS_MAPPING)})")

    def warn_if_padding_and_no_attention_mask(self, input_ids, attention_mask) -> None:
        """HF warns when padding tokens appear without a mask; the numbers do not change."""
        pad = getattr(self.config, "pad_token_id", None)
        if attention_mask is None and pad is not None and bool((input_ids == pad).any()):
            logging.getLogger(__name__).warning("padding tokens in input_ids but no attention_mask")

    @property
    def dtype(self):
        return next(iter(self.parameters())).dtype


class _NotInRuntime(paddle.nn.Layer):
    """A head the runtime does not provide: the class defines, instantiating it fails."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} relies on a transformers head that align's runtime "
                                  "does not provide")


class BackboneMixin(_NotInRuntime):
    """Backbones (feature maps for detection and segmentation heads) are not in the runtime."""


class GenericForSequenceClassification(_NotInRuntime):
    pass


class GenericForTokenClassification(_NotInRuntime):
    pass


class GenericForQuestionAnswering(_NotInRuntime):
    pass


def slice_logits_to_keep(hidden_states: paddle.Tensor, logits_to_keep) -> paddle.Tensor:
    """0 keeps every position; n > 0 keeps the last n; a tensor holds the positions to keep."""
    if isinstance(logits_to_keep, int):
        return hidden_states if logits_to_keep == 0 else hidden_states[:, -logits_to_keep:, :]
    return paddle.index_select(hidden_states, logits_to_keep, axis=1)
