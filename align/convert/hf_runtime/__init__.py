"""A Paddle stand-in for the transformers infrastructure that converted HF modeling files
import (`align convert` points their `from ...X import Y` lines here).

It is this project's own code, kept small: what changes numbers is implemented with torch's
semantics (losses, masks, embeddings, type promotion, initialisation, weight tying); what is
outside an alignment (KV caches, generation, hub kernels, output capture) either changes
nothing or fails loudly. Config classes are not here: converted files import transformers'
own, which are plain Python.
"""

from align.convert.hf_runtime import hf_logging as logging
from align.convert.hf_runtime import initialization
from align.convert.hf_runtime.activations import ACT2FN, get_activation
from align.convert.hf_runtime.attention import (
    ALL_ATTENTION_FUNCTIONS,
    AttentionInterface,
    sdpa_attention_forward,
)
from align.convert.hf_runtime.cache import Cache, DynamicCache
from align.convert.hf_runtime.decorators import (
    FlashAttentionKwargs,
    OutputRecorder,
    TransformersKwargs,
    Unpack,
    auto_docstring,
    can_return_tuple,
    capture_outputs,
    filter_output_hidden_states,
    merge_with_config_defaults,
    use_kernel_forward_from_hub,
    use_kernelized_func,
)
from align.convert.hf_runtime.dtypes import promote, result_type
from align.convert.hf_runtime.losses import CrossEntropyLoss, cross_entropy
from align.convert.hf_runtime.masks import (
    create_bidirectional_mask,
    create_bidirectional_sliding_window_mask,
    create_causal_mask,
    create_sliding_window_causal_mask,
)
from align.convert.hf_runtime.modeling import (
    BackboneMixin,
    GenerationMixin,
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
    PreTrainedModel,
    slice_logits_to_keep,
)
from align.convert.hf_runtime.nn import Conv1d, Conv2d, Embedding
from align.convert.hf_runtime.outputs import (
    BackboneOutput,
    BaseModelOutput,
    BaseModelOutputWithPast,
    BaseModelOutputWithPooling,
    CausalLMOutputWithPast,
    ImageClassifierOutput,
    MaskedLMOutput,
    ModelOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from align.convert.hf_runtime.rope import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from align.convert.hf_runtime.torch_functions import torch_function, torch_int

__all__ = [name for name in dir() if not name.startswith("_")]
