"""Model output containers: dataclasses read by attribute, by key, or by position (the
position counts only fields that are set, as in transformers' ModelOutput)."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class ModelOutput:
    def to_tuple(self) -> tuple:
        return tuple(v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None)

    def __getitem__(self, key: int | str | slice) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


def _output(name: str, *fields: str) -> type:
    cls = dataclasses.make_dataclass(name, [(f, Any, dataclasses.field(default=None)) for f in fields],
                                     bases=(ModelOutput,))
    cls.__module__ = __name__
    return cls


BaseModelOutput = _output("BaseModelOutput", "last_hidden_state", "hidden_states", "attentions")
BaseModelOutputWithPast = _output("BaseModelOutputWithPast", "last_hidden_state", "past_key_values",
                                  "hidden_states", "attentions")
BaseModelOutputWithPooling = _output("BaseModelOutputWithPooling", "last_hidden_state", "pooler_output",
                                     "hidden_states", "attentions")
CausalLMOutputWithPast = _output("CausalLMOutputWithPast", "loss", "logits", "past_key_values", "hidden_states",
                                 "attentions")
MaskedLMOutput = _output("MaskedLMOutput", "loss", "logits", "hidden_states", "attentions")
SequenceClassifierOutput = _output("SequenceClassifierOutput", "loss", "logits", "hidden_states", "attentions")
SequenceClassifierOutputWithPast = _output("SequenceClassifierOutputWithPast", "loss", "logits",
                                           "past_key_values", "hidden_states", "attentions")
TokenClassifierOutput = _output("TokenClassifierOutput", "loss", "logits", "hidden_states", "attentions")
MultipleChoiceModelOutput = _output("MultipleChoiceModelOutput", "loss", "logits", "hidden_states", "attentions")
QuestionAnsweringModelOutput = _output("QuestionAnsweringModelOutput", "loss", "start_logits", "end_logits",
                                       "hidden_states", "attentions")
ImageClassifierOutput = _output("ImageClassifierOutput", "loss", "logits", "hidden_states", "attentions")
BackboneOutput = _output("BackboneOutput", "feature_maps", "hidden_states", "attentions")
