"""CLIPModel in Paddle: a text tower and a vision tower, projected into one space and scored
against each other with a contrastive loss.

Reference: transformers 5.23.0, src/transformers/models/clip/modeling_clip.py, eager attention.
Module names follow the reference one to one: `text_model.{embeddings.{token_embedding,
position_embedding}, encoder.layers.N.{self_attn.{q_proj, k_proj, v_proj, out_proj}, layer_norm1,
mlp.{fc1, activation_fn, fc2}, layer_norm2}, final_layer_norm}`, `vision_model.{embeddings.
{class_embedding, patch_embedding, position_embedding}, pre_layrnorm, encoder, post_layernorm}`,
`visual_projection`, `text_projection`, `logit_scale`.

Deliberate differences from the reference:
- Eager attention only; no `interpolate_pos_encoding`; no hidden states or attentions in the
  outputs.
- The text tower takes an explicit `position_ids` or none, as the reference, but not
  `inputs_embeds`.
- `paddle.nn.Linear` stores weights as [in, out]; the weight rules transpose them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ports.common import PortConfig, additive_mask, cross_entropy_ignoring


class QuickGELUActivation(nn.Layer):
    """transformers' quick_gelu: x * sigmoid(1.702 x), the activation OpenAI's CLIP trained with."""

    def forward(self, x):
        return x * F.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": QuickGELUActivation, "gelu": lambda: nn.GELU(approximate=False),
               "gelu_pytorch_tanh": lambda: nn.GELU(approximate=True)}


@dataclass
class CLIPTextConfig(PortConfig):
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407


@dataclass
class CLIPVisionConfig(PortConfig):
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0


@dataclass
class CLIPConfig(PortConfig):
    text_config: CLIPTextConfig | dict = field(default_factory=CLIPTextConfig)
    vision_config: CLIPVisionConfig | dict = field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    def __post_init__(self):
        # transformers' to_dict() nests each tower's config as a plain dict.
        if isinstance(self.text_config, dict):
            self.text_config = CLIPTextConfig.from_dict(self.text_config)
        if isinstance(self.vision_config, dict):
            self.vision_config = CLIPVisionConfig.from_dict(self.vision_config)
        for tower in (self.text_config, self.vision_config):
            if tower.hidden_act not in ACTIVATIONS:
                raise ValueError(f"unsupported hidden_act {tower.hidden_act!r}; this port knows {sorted(ACTIVATIONS)}")


@dataclass
class BaseModelOutput:
    last_hidden_state: paddle.Tensor


@dataclass
class BaseModelOutputWithPooling:
    last_hidden_state: paddle.Tensor
    pooler_output: paddle.Tensor


@dataclass
class CLIPOutput:
    loss: paddle.Tensor | None
    logits_per_image: paddle.Tensor
    logits_per_text: paddle.Tensor
    text_embeds: paddle.Tensor
    image_embeds: paddle.Tensor
    text_model_output: BaseModelOutputWithPooling
    vision_model_output: BaseModelOutputWithPooling


def contrastive_loss(logits):
    """Cross-entropy of each row against its own column: the i-th text belongs to the i-th image."""
    return cross_entropy_ignoring(logits, paddle.arange(logits.shape[0]))


def image_text_contrastive_loss(similarity):
    return (contrastive_loss(similarity) + contrastive_loss(similarity.t())) / 2.0


def _vector_norm(x):
    """The L2 norm over the last axis, as the reference spells it (pow, sum, pow 0.5)."""
    return paddle.pow(paddle.sum(paddle.pow(x, 2), axis=-1, keepdim=True), 0.5)


class CLIPVisionEmbeddings(nn.Layer):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.image_size, self.patch_size = config.image_size, config.patch_size
        self.class_embedding = self.create_parameter([config.hidden_size],
                                                     default_initializer=nn.initializer.Normal())
        self.patch_embedding = nn.Conv2D(config.num_channels, config.hidden_size, kernel_size=self.patch_size,
                                         stride=self.patch_size, bias_attr=False)
        self.num_positions = (self.image_size // self.patch_size) ** 2 + 1  # one more for the class token
        self.position_embedding = nn.Embedding(self.num_positions, config.hidden_size)

    def forward(self, pixel_values, interpolate_pos_encoding=False):
        B, _, H, W = pixel_values.shape
        if interpolate_pos_encoding:
            raise NotImplementedError("interpolate_pos_encoding is not ported: feed images of config.image_size")
        if H != self.image_size or W != self.image_size:
            raise ValueError(f"Input image size ({H}*{W}) doesn't match model ({self.image_size}*{self.image_size}).")
        patches = self.patch_embedding(pixel_values.astype(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose([0, 2, 1])  # (B, N, D)
        embeddings = paddle.concat([self.class_embedding.expand([B, 1, -1]), patches], axis=1)
        return embeddings + self.position_embedding(paddle.arange(self.num_positions).unsqueeze(0))


class CLIPTextEmbeddings(nn.Layer):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids, position_ids=None):
        T = input_ids.shape[-1]
        if T > self.position_embedding.weight.shape[0]:
            raise ValueError(f"Sequence length must be less than max_position_embeddings (got `sequence length`: "
                             f"{T} and max_position_embeddings: {self.position_embedding.weight.shape[0]}")
        if position_ids is None:
            position_ids = paddle.arange(T).unsqueeze(0)
        return self.token_embedding(input_ids) + self.position_embedding(position_ids)


class CLIPAttention(nn.Layer):
    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig):
        super().__init__()
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states, attention_mask=None):
        B, T = hidden_states.shape[:2]

        def heads(x):
            return x.reshape([B, T, -1, self.head_dim]).transpose([0, 2, 1, 3])

        q, k, v = heads(self.q_proj(hidden_states)), heads(self.k_proj(hidden_states)), heads(self.v_proj(hidden_states))
        scores = paddle.matmul(q, k, transpose_y=True) * self.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = F.softmax(scores.astype("float32"), axis=-1).astype(q.dtype)
        weights = F.dropout(weights, p=self.dropout, training=self.training)
        out = paddle.matmul(weights, v).transpose([0, 2, 1, 3]).reshape([B, T, -1])
        return self.out_proj(out), weights


class CLIPMLP(nn.Layer):
    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig):
        super().__init__()
        self.activation_fn = ACTIVATIONS[config.hidden_act]()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states):
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class CLIPEncoderLayer(nn.Layer):
    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps)

    def forward(self, hidden_states, attention_mask=None):
        h, _ = self.self_attn(self.layer_norm1(hidden_states), attention_mask)
        hidden_states = hidden_states + h
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class CLIPEncoder(nn.Layer):
    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig):
        super().__init__()
        self.layers = nn.LayerList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, inputs_embeds, attention_mask=None, is_causal: bool = False):
        # is_causal is what the reference tells other attention kernels; the eager mask
        # already holds the causality.
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask)
        return BaseModelOutput(last_hidden_state=hidden_states)


class CLIPTextModel(nn.Layer):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps)
        self.eos_token_id = config.eos_token_id

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        input_ids = input_ids.reshape([-1, input_ids.shape[-1]])
        hidden_states = self.embeddings(input_ids, position_ids)
        T = input_ids.shape[1]
        # Causal, and no key that is padding: transformers' eager mask, finfo.min where not allowed.
        allowed = paddle.tril(paddle.ones([T, T], dtype="bool")).reshape([1, 1, T, T])
        if attention_mask is not None:
            allowed = paddle.logical_and(allowed, attention_mask.astype("bool")[:, None, None, :])
        mask = additive_mask(allowed, hidden_states.dtype)
        last_hidden_state = self.final_layer_norm(
            self.encoder(inputs_embeds=hidden_states, attention_mask=mask, is_causal=True).last_hidden_state)
        if self.eos_token_id == 2:
            # Configs from before transformers' PR #24773: the highest token id marks the end.
            ends = input_ids.astype("int32").argmax(axis=-1)
        else:
            # The first end-of-text token of each sequence (padding may use the same id).
            ends = (input_ids.astype("int32") == self.eos_token_id).astype("int32").argmax(axis=-1)
        pooled = last_hidden_state[paddle.arange(last_hidden_state.shape[0]), ends]
        return BaseModelOutputWithPooling(last_hidden_state=last_hidden_state, pooler_output=pooled)


class CLIPVisionModel(nn.Layer):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps)  # the reference's spelling
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps)

    def forward(self, pixel_values, interpolate_pos_encoding=False):
        hidden_states = self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding))
        last_hidden_state = self.encoder(inputs_embeds=hidden_states).last_hidden_state
        # The class token, normed: last_hidden_state itself stays unnormed.
        pooled = self.post_layernorm(last_hidden_state[:, 0, :])
        return BaseModelOutputWithPooling(last_hidden_state=last_hidden_state, pooler_output=pooled)


class CLIPModel(nn.Layer):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextModel(config.text_config)
        self.vision_model = CLIPVisionModel(config.vision_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias_attr=False)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias_attr=False)
        self.logit_scale = self.create_parameter(
            [], default_initializer=nn.initializer.Constant(config.logit_scale_init_value))

    def forward(self, input_ids, pixel_values, attention_mask=None, position_ids=None, return_loss=None,
                interpolate_pos_encoding=False):
        vision_outputs = self.vision_model(pixel_values, interpolate_pos_encoding)
        vision_outputs.pooler_output = self.visual_projection(vision_outputs.pooler_output)
        text_outputs = self.text_model(input_ids, attention_mask, position_ids)
        text_outputs.pooler_output = self.text_projection(text_outputs.pooler_output)

        image_embeds = vision_outputs.pooler_output / _vector_norm(vision_outputs.pooler_output)
        text_embeds = text_outputs.pooler_output / _vector_norm(text_outputs.pooler_output)
        # Cosine similarity, scaled by a learned temperature (kept as its log).
        logits_per_text = paddle.matmul(text_embeds, image_embeds.t()) * self.logit_scale.exp()
        logits_per_image = logits_per_text.t()
        loss = image_text_contrastive_loss(logits_per_text) if return_loss else None
        return CLIPOutput(loss=loss, logits_per_image=logits_per_image, logits_per_text=logits_per_text,
                          text_embeds=text_embeds, image_embeds=image_embeds,
                          text_model_output=text_outputs, vision_model_output=vision_outputs)


__all__ = ["CLIPConfig", "CLIPModel", "CLIPTextModel", "CLIPVisionModel", "image_text_contrastive_loss"]
