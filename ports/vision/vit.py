"""ViTForImageClassification in Paddle.

Reference: transformers 5.23.0, src/transformers/models/vit/modeling_vit.py, eager attention.
Module names follow the reference one to one: `vit.embeddings.{cls_token, position_embeddings}`,
`vit.embeddings.patch_embeddings.projection`, `vit.layers.0.{layernorm_before, attention.q_proj,
k_proj, v_proj, o_proj, layernorm_after, mlp.fc1, mlp.fc2}`, `vit.layernorm`, `classifier`.
(transformers 5.x dropped the 4.x tree `vit.encoder.layer.0.attention.attention.query`; its
conversion_mapping.py, entry "ViTModel", renames old checkpoints' keys on load.)

Deliberate differences from the reference:
- Eager attention only; no `interpolate_pos_encoding` (raises) and no mask token or
  `bool_masked_pos` (they serve ViTForMaskedImageModeling, which is not ported).
- `attention_mask`, if given, must be 2D (B, N + 1) over the tokens ([CLS] first); the
  reference also accepts a ready 4D mask.
- No `hidden_states` / `attentions` in the output: only `loss` and `logits`.
- The loss's problem_type is decided on every call and not written back into the config
  (the reference stores its first decision in `config.problem_type`, so it sticks).
  int32 labels are classified here; the reference routes them to cross-entropy too, where
  torch's CPU kernel then rejects them ("expected target dtype to be Long").
- `paddle.nn.Linear` stores weights as [in, out]; the weight rules transpose them.
  `paddle.nn.Conv2D` stores [out, in, kh, kw], as torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ports.common import PortConfig, additive_mask, cross_entropy_ignoring, key_padding

# ACT2FN["gelu"] is exact (erf) GELU in transformers.
ACTIVATIONS = {"gelu": lambda: nn.GELU(approximate=False), "gelu_pytorch_tanh": lambda: nn.GELU(approximate=True),
               "relu": nn.ReLU, "tanh": nn.Tanh}


def _activation(name: str, key: str) -> nn.Layer:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported {key} {name!r}; this port knows {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _pair(size) -> tuple[int, int]:
    """`image_size` / `patch_size` as (height, width): the config holds an int or a pair."""
    return (size[0], size[1]) if isinstance(size, (list, tuple)) else (size, size)


@dataclass
class ViTConfig(PortConfig):
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    head_dim: int | None = None
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    image_size: int | list[int] = 224
    patch_size: int | list[int] = 16
    num_channels: int = 3
    qkv_bias: bool = True
    pooler_output_size: int | None = None
    pooler_act: str = "tanh"
    id2label: dict | None = None
    num_labels: int | None = None
    problem_type: str | None = None

    def __post_init__(self):
        # transformers' to_dict() carries id2label, not num_labels (a property, len(id2label));
        # with neither, a config has 2 labels (configuration_utils.py).
        if self.id2label is not None:
            if self.num_labels is not None and self.num_labels != len(self.id2label):
                raise ValueError(f"num_labels={self.num_labels} does not match id2label of length {len(self.id2label)}")
            self.num_labels = len(self.id2label)
        elif self.num_labels is None:
            self.num_labels = 2
        # ViTAttention reads getattr(config, "head_dim", hidden_size // num_attention_heads).
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not self.pooler_output_size:
            self.pooler_output_size = self.hidden_size


@dataclass
class BaseModelOutputWithPooling:
    last_hidden_state: paddle.Tensor
    pooler_output: paddle.Tensor | None


@dataclass
class ImageClassifierOutput:
    loss: paddle.Tensor | None
    logits: paddle.Tensor


class ViTPatchEmbeddings(nn.Layer):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.image_size, self.patch_size = _pair(config.image_size), _pair(config.patch_size)
        self.num_patches = (self.image_size[0] // self.patch_size[0]) * (self.image_size[1] // self.patch_size[1])
        self.num_channels = config.num_channels
        # One stride-p convolution = a Linear applied to each non-overlapping p x p patch.
        self.projection = nn.Conv2D(config.num_channels, config.hidden_size, kernel_size=self.patch_size,
                                    stride=self.patch_size)

    def forward(self, pixel_values):
        if pixel_values.shape[1] != self.num_channels:
            raise ValueError(f"pixel_values has {pixel_values.shape[1]} channels; "
                             f"the config expects {self.num_channels}")
        patches = self.projection(pixel_values)  # (B, h, H/p, W/p)
        return patches.flatten(2).transpose([0, 2, 1])  # (B, N, h), patches in row-major order


class ViTEmbeddings(nn.Layer):
    def __init__(self, config: ViTConfig):
        super().__init__()
        init = nn.initializer.TruncatedNormal(mean=0.0, std=config.initializer_range)
        self.cls_token = self.create_parameter([1, 1, config.hidden_size], default_initializer=init)
        self.patch_embeddings = ViTPatchEmbeddings(config)
        num_positions = self.patch_embeddings.num_patches + 1  # one more for [CLS]
        self.position_embeddings = self.create_parameter([1, num_positions, config.hidden_size],
                                                         default_initializer=init)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.image_size = self.patch_embeddings.image_size

    def forward(self, pixel_values, interpolate_pos_encoding: bool | None = False):
        if interpolate_pos_encoding:
            raise NotImplementedError("interpolate_pos_encoding is not ported: feed images of config.image_size")
        B, _, H, W = pixel_values.shape
        embeddings = self.patch_embeddings(pixel_values)  # (B, N, h)
        # [CLS] is prepended first, so position row 0 belongs to it and rows 1.. to the patches.
        embeddings = paddle.concat([self.cls_token.expand([B, -1, -1]), embeddings], axis=1)  # (B, N+1, h)
        if (H, W) != self.image_size:
            raise ValueError(f"input image size ({H}*{W}) doesn't match model "
                             f"({self.image_size[0]}*{self.image_size[1]}); interpolate_pos_encoding is not ported")
        embeddings = embeddings + self.position_embeddings  # (1, N+1, h) broadcast over the batch
        return self.dropout(embeddings)


class ViTAttention(nn.Layer):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        inner = config.num_attention_heads * self.head_dim
        bias = None if config.qkv_bias else False  # None: paddle's default bias
        self.q_proj = nn.Linear(config.hidden_size, inner, bias_attr=bias)
        self.k_proj = nn.Linear(config.hidden_size, inner, bias_attr=bias)
        self.v_proj = nn.Linear(config.hidden_size, inner, bias_attr=bias)
        self.o_proj = nn.Linear(inner, config.hidden_size)  # biased whatever qkv_bias says

    def forward(self, hidden_states, attention_mask=None):
        B, T = hidden_states.shape[:2]

        def heads(x):
            return x.reshape([B, T, -1, self.head_dim]).transpose([0, 2, 1, 3])  # (B, nh, T, hd)

        q, k, v = (heads(proj(hidden_states)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        scores = paddle.matmul(q, k, transpose_y=True) * self.scaling  # (B, nh, T, T)
        if attention_mask is not None:
            scores = scores + attention_mask
        # Softmax in fp32, then back to the compute dtype, as the reference's eager_attention_forward.
        weights = F.softmax(scores.astype("float32"), axis=-1).astype(q.dtype)
        weights = F.dropout(weights, p=self.attention_dropout, training=self.training)
        out = paddle.matmul(weights, v).transpose([0, 2, 1, 3]).reshape([B, T, -1])  # (B, T, nh*hd)
        return self.o_proj(out), weights


class ViTMLP(nn.Layer):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.activation_fn = _activation(config.hidden_act, "hidden_act")
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states):
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class ViTLayer(nn.Layer):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.attention = ViTAttention(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps)
        self.mlp = ViTMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, attention_mask=None):
        # Pre-norm residual blocks (unlike BERT's post-norm).
        h, _ = self.attention(self.layernorm_before(hidden_states), attention_mask)
        hidden_states = self.dropout(h) + hidden_states
        h = self.mlp(self.layernorm_after(hidden_states))
        return self.dropout(h) + hidden_states


class ViTPooler(nn.Layer):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.pooler_output_size)
        self.activation = _activation(config.pooler_act, "pooler_act")

    def forward(self, hidden_states):
        return self.activation(self.dense(hidden_states[:, 0]))  # the [CLS] token


class ViTModel(nn.Layer):
    def __init__(self, config: ViTConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = ViTEmbeddings(config)
        self.layers = nn.LayerList([ViTLayer(config) for _ in range(config.num_hidden_layers)])
        self.layernorm = nn.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps)
        self.pooler = ViTPooler(config) if add_pooling_layer else None

    def forward(self, pixel_values, interpolate_pos_encoding: bool | None = None, attention_mask=None):
        # The reference casts the pixels to the patch projection's dtype.
        dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        if pixel_values.dtype != dtype:
            pixel_values = pixel_values.astype(dtype)
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding)  # (B, N+1, h)
        mask = None
        if attention_mask is not None:
            T = hidden_states.shape[1]
            if attention_mask.ndim != 2 or attention_mask.shape[1] != T:
                raise ValueError(f"attention_mask must be (B, {T}) over [CLS] + patches; got {attention_mask.shape}")
            # Bidirectional: every query sees every kept key (transformers' eager mask, finfo.min elsewhere).
            mask = additive_mask(key_padding(attention_mask, T), hidden_states.dtype)  # (B, 1, 1, T)
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask)
        sequence_output = self.layernorm(hidden_states)
        pooled = self.pooler(sequence_output) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=pooled)


def image_classification_loss(labels, logits, num_labels: int, problem_type: str | None = None):
    """transformers' ForSequenceClassificationLoss (loss/loss_utils.py), which the reference's
    loss_type "ForImageClassification" maps to. Without a problem_type: one label is regression;
    more, with int64 or int32 labels, single-label cross-entropy; anything else, multi-label."""
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif num_labels > 1 and labels.dtype in (paddle.int64, paddle.int32):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze())
        return F.mse_loss(logits, labels)
    if problem_type == "single_label_classification":
        # Mean over the labels that are not -100, as torch's cross_entropy(ignore_index=-100).
        loss = cross_entropy_ignoring(logits.reshape([-1, num_labels]), labels.reshape([-1]))
        return loss.astype(logits.dtype)
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels)
    raise ValueError(f"invalid problem_type {problem_type!r}")


class ViTForImageClassification(nn.Layer):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.vit = ViTModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()

    def forward(self, pixel_values, labels=None, interpolate_pos_encoding: bool | None = None, attention_mask=None):
        sequence_output = self.vit(pixel_values, interpolate_pos_encoding, attention_mask).last_hidden_state
        logits = self.classifier(sequence_output[:, 0, :])  # (B, num_labels), from the [CLS] token
        loss = None
        if labels is not None:
            loss = image_classification_loss(labels, logits, self.num_labels, self.config.problem_type)
        return ImageClassifierOutput(loss=loss, logits=logits)


__all__ = ["ViTConfig", "ViTForImageClassification", "ViTModel", "image_classification_loss"]
