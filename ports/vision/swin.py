"""SwinForImageClassification in Paddle.

Reference: transformers 5.23.0, src/transformers/models/swin/modeling_swin.py, eager attention.
Module names follow the reference one to one: `swin.embeddings.{patch_embeddings.projection,
norm}`, `swin.encoder.layers.S.blocks.B.{layernorm_before, attention.{q_proj, k_proj, v_proj,
o_proj, relative_position_bias}, layernorm_after, mlp.fc1, mlp.fc2}`,
`swin.encoder.layers.S.downsample.{norm, reduction}`, `swin.layernorm`, `swin.pooler`,
`classifier`.

Deliberate differences from the reference:
- Eager attention only; no `interpolate_pos_encoding`, no mask token or `bool_masked_pos`
  (they serve SwinForMaskedImageModeling, which is not ported); no hidden states or
  attentions in the output: only `loss` and `logits`.
- The reference's SwinLayer clamps its window and shift on every call by writing to itself
  (`set_shift_and_window_size`); here the clamped values are computed per call and nothing is
  written back.
- `paddle.nn.Linear` stores weights as [in, out]; the weight rules transpose them.
"""

from __future__ import annotations

from dataclasses import dataclass

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ports.common import PortConfig
from ports.vision.vit import ACTIVATIONS, image_classification_loss


def _pair(size) -> tuple[int, int]:
    return (size[0], size[1]) if isinstance(size, (list, tuple)) else (size, size)


@dataclass
class SwinConfig(PortConfig):
    image_size: int | list[int] = 224
    patch_size: int | list[int] = 4
    num_channels: int = 3
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    drop_path_rate: float = 0.1
    hidden_act: str = "gelu"
    use_absolute_embeddings: bool = False
    layer_norm_eps: float = 1e-5
    id2label: dict | None = None
    num_labels: int | None = None
    problem_type: str | None = None

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; this port knows {sorted(ACTIVATIONS)}")
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths {list(self.depths)} and num_heads {list(self.num_heads)} differ in length")
        if self.id2label is not None:
            self.num_labels = len(self.id2label)
        elif self.num_labels is None:
            self.num_labels = 2
        self.num_features = int(self.embed_dim * 2 ** (len(self.depths) - 1))


@dataclass
class SwinEncoderOutput:
    last_hidden_state: paddle.Tensor


@dataclass
class SwinModelOutput:
    last_hidden_state: paddle.Tensor
    pooler_output: paddle.Tensor


@dataclass
class SwinImageClassifierOutput:
    loss: paddle.Tensor | None
    logits: paddle.Tensor


def _pad_bottom_right(x, bottom: int, right: int):
    """Zero-pad a (B, H, W, C) map at the bottom and on the right, as the reference's
    F.pad(x, (0, 0, 0, right, 0, bottom))."""
    B, H, W, C = x.shape
    if right:
        x = paddle.concat([x, paddle.zeros([B, H, right, C], dtype=x.dtype)], axis=2)
    if bottom:
        x = paddle.concat([x, paddle.zeros([B, bottom, W + right, C], dtype=x.dtype)], axis=1)
    return x


def window_partition(x, window_size: int):
    """(B, H, W, C) -> (B * H/ws * W/ws, ws, ws, C), windows in row-major order."""
    B, H, W, C = x.shape
    x = x.reshape([B, H // window_size, window_size, W // window_size, window_size, C])
    return x.transpose([0, 1, 3, 2, 4, 5]).reshape([-1, window_size, window_size, C])


def window_reverse(windows, window_size: int, height: int, width: int):
    C = windows.shape[-1]
    x = windows.reshape([-1, height // window_size, width // window_size, window_size, window_size, C])
    return x.transpose([0, 1, 3, 2, 4, 5]).reshape([-1, height, width, C])


class SwinPatchEmbeddings(nn.Layer):
    def __init__(self, config: SwinConfig):
        super().__init__()
        image_size, self.patch_size = _pair(config.image_size), _pair(config.patch_size)
        self.grid_size = (image_size[0] // self.patch_size[0], image_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.projection = nn.Conv2D(config.num_channels, config.embed_dim, kernel_size=self.patch_size,
                                    stride=self.patch_size)

    def forward(self, pixel_values):
        _, _, H, W = pixel_values.shape
        ph, pw = self.patch_size
        if H % ph or W % pw:  # the reference pads the image up to whole patches
            pixel_values = _pad_bottom_right(pixel_values.transpose([0, 2, 3, 1]), -H % ph, -W % pw).transpose([0, 3, 1, 2])
        embeddings = self.projection(pixel_values)  # (B, C, H/p, W/p)
        dims = (embeddings.shape[2], embeddings.shape[3])
        return embeddings.flatten(2).transpose([0, 2, 1]), dims


class SwinEmbeddings(nn.Layer):
    def __init__(self, config: SwinConfig):
        super().__init__()
        self.patch_embeddings = SwinPatchEmbeddings(config)
        self.patch_grid = self.patch_embeddings.grid_size
        self.position_embeddings = (
            self.create_parameter([1, self.patch_embeddings.num_patches, config.embed_dim],
                                  default_initializer=nn.initializer.Constant(0.0))
            if config.use_absolute_embeddings else None)
        self.norm = nn.LayerNorm(config.embed_dim)  # torch's default eps, not the config's
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values):
        embeddings, dims = self.patch_embeddings(pixel_values)
        embeddings = self.norm(embeddings)
        if self.position_embeddings is not None:
            embeddings = embeddings + self.position_embeddings
        return self.dropout(embeddings), dims


class SwinPatchMerging(nn.Layer):
    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias_attr=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, input_feature, input_dimensions):
        H, W = input_dimensions
        B, _, C = input_feature.shape
        x = _pad_bottom_right(input_feature.reshape([B, H, W, C]), H % 2, W % 2)
        # The four 2x2 neighbours side by side, in the reference's order: column-major over the
        # 2x2 block, (0,0), (1,0), (0,1), (1,1).
        x = paddle.concat([x[:, row::2, col::2, :] for col in range(2) for row in range(2)], axis=-1)
        return self.reduction(self.norm(x.reshape([B, -1, 4 * C])))


class SwinRelativePositionBias(nn.Layer):
    def __init__(self, num_heads: int, window_size: int):
        super().__init__()
        self.window_size = window_size
        self.relative_position_bias_table = self.create_parameter(
            [(2 * window_size - 1) ** 2, num_heads], default_initializer=nn.initializer.Constant(0.0))
        self.register_buffer("relative_position_index", self._index(window_size), persistable=False)

    @staticmethod
    def _index(ws: int):
        """For each (query, key) pair of a window's positions, the table row of their offset
        (dh, dw), each shifted to start at 0: (dh + ws - 1) * (2 ws - 1) + (dw + ws - 1)."""
        coords = paddle.stack(paddle.meshgrid(paddle.arange(ws), paddle.arange(ws))).flatten(1)  # (2, ws*ws)
        rel = (coords.unsqueeze(2) - coords.unsqueeze(1)).transpose([1, 2, 0])  # (ws*ws, ws*ws, 2)
        return ((rel[:, :, 0] + ws - 1) * (2 * ws - 1) + (rel[:, :, 1] + ws - 1)).flatten()

    def forward(self):
        area = self.window_size**2
        bias = paddle.gather(self.relative_position_bias_table, self.relative_position_index)  # (area*area, nh)
        return bias.reshape([area, area, -1]).transpose([2, 0, 1]).unsqueeze(0)  # (1, nh, area, area)


class SwinAttention(nn.Layer):
    def __init__(self, config: SwinConfig, hidden_size: int, num_attention_heads: int, window_size: int):
        super().__init__()
        self.head_dim = hidden_size // num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        bias = None if config.qkv_bias else False
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias_attr=bias)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias_attr=bias)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias_attr=bias)
        self.o_proj = nn.Linear(hidden_size, hidden_size)
        self.relative_position_bias = SwinRelativePositionBias(num_attention_heads, window_size)

    def forward(self, hidden_states, attention_mask=None):
        BW, N, _ = hidden_states.shape  # (batch * windows, ws*ws, C)

        def heads(x):
            return x.reshape([BW, N, -1, self.head_dim]).transpose([0, 2, 1, 3])

        q, k, v = (heads(proj(hidden_states)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        mask = self.relative_position_bias()  # (1, nh, N, N)
        if attention_mask is not None:  # (windows, N, N): the shifted windows' regions
            windows = attention_mask.shape[0]
            shifted = attention_mask.unsqueeze(1).unsqueeze(0).expand([BW // windows, -1, -1, -1, -1])
            mask = mask + shifted.reshape([-1, 1, N, N])
        scores = paddle.matmul(q, k, transpose_y=True) * self.scaling + mask
        weights = F.softmax(scores.astype("float32"), axis=-1).astype(q.dtype)
        weights = F.dropout(weights, p=self.attention_dropout, training=self.training)
        out = paddle.matmul(weights, v).transpose([0, 2, 1, 3]).reshape([BW, N, -1])
        return self.o_proj(out), weights


class SwinMLP(nn.Layer):
    def __init__(self, config: SwinConfig, dim: int):
        super().__init__()
        self.activation_fn = ACTIVATIONS[config.hidden_act]()
        self.fc1 = nn.Linear(dim, int(config.mlp_ratio * dim))
        self.fc2 = nn.Linear(int(config.mlp_ratio * dim), dim)

    def forward(self, hidden_states):
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


def shifted_window_mask(height: int, width: int, window_size: int, shift_size: int, dtype):
    """The attention mask of shifted windows, (windows, ws*ws, ws*ws): after the cyclic shift a
    window may hold pixels of up to 3 x 3 regions that were not neighbours; attention between
    two regions gets -100 (the reference's value), within one 0."""
    h = paddle.arange(height)
    w = paddle.arange(width)
    h_region = (h >= height - window_size).astype("int64") + (h >= height - shift_size).astype("int64")
    w_region = (w >= width - window_size).astype("int64") + (w >= width - shift_size).astype("int64")
    regions = (h_region.reshape([1, -1, 1, 1]) * 3 + w_region.reshape([1, 1, -1, 1])).astype(dtype)
    windows = window_partition(regions, window_size).reshape([-1, window_size * window_size])
    differ = windows.unsqueeze(1) - windows.unsqueeze(2)
    return paddle.where(differ != 0, paddle.full([], -100.0, dtype=dtype), paddle.zeros([], dtype=dtype))


class SwinLayer(nn.Layer):
    def __init__(self, config: SwinConfig, dim: int, num_heads: int, shift_size: int = 0):
        super().__init__()
        self.attention = SwinAttention(config, dim, num_heads, window_size=config.window_size)
        self.layernorm_before = nn.LayerNorm(dim, epsilon=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(dim, epsilon=config.layer_norm_eps)
        self.mlp = SwinMLP(config, dim)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.drop_path = nn.Identity()  # stochastic depth is the identity outside training
        self.window_size = config.window_size
        self.shift_size = shift_size

    def forward(self, hidden_states, input_dimensions):
        H, W = input_dimensions
        # A map no larger than a window is one window, unshifted (the reference's clamp).
        ws, shift = (min(H, W), 0) if min(H, W) <= self.window_size else (self.window_size, self.shift_size)
        B, _, C = hidden_states.shape
        shortcut = hidden_states
        x = self.layernorm_before(hidden_states).reshape([B, H, W, C])
        x = _pad_bottom_right(x, -H % ws, -W % ws)
        Hp, Wp = x.shape[1], x.shape[2]
        if shift:  # the windows move up and left by `shift`, and move back after attention
            x = paddle.roll(x, shifts=(-shift, -shift), axis=(1, 2))
        windows = window_partition(x, ws).reshape([-1, ws * ws, C])
        mask = shifted_window_mask(Hp, Wp, ws, shift, x.dtype) if shift else None
        attention_output, weights = self.attention(windows, mask)
        attention_output = self.dropout(attention_output)
        x = window_reverse(attention_output.reshape([-1, ws, ws, C]), ws, Hp, Wp)
        if shift:
            x = paddle.roll(x, shifts=(shift, shift), axis=(1, 2))
        x = x[:, :H, :W, :].reshape([B, H * W, C])
        hidden_states = shortcut + self.drop_path(x)
        return self.dropout(self.mlp(self.layernorm_after(hidden_states))) + hidden_states, weights


class SwinStage(nn.Layer):
    def __init__(self, config: SwinConfig, dim: int, depth: int, num_heads: int, downsample: bool):
        super().__init__()
        self.blocks = nn.LayerList([
            SwinLayer(config, dim, num_heads, shift_size=0 if i % 2 == 0 else config.window_size // 2)
            for i in range(depth)])
        self.downsample = SwinPatchMerging(dim) if downsample else None

    def forward(self, hidden_states, input_dimensions):
        weights = None
        for block in self.blocks:
            hidden_states, weights = block(hidden_states, input_dimensions)
        H, W = input_dimensions
        if self.downsample is not None:
            hidden_states = self.downsample(hidden_states, input_dimensions)
            H, W = (H + 1) // 2, (W + 1) // 2
        # The stage's map as an image, (B, C, H, W), as the reference also returns it.
        B, _, C = hidden_states.shape
        spatial = hidden_states.reshape([B, H, W, C]).transpose([0, 3, 1, 2])
        return hidden_states, spatial, weights


class SwinEncoder(nn.Layer):
    def __init__(self, config: SwinConfig):
        super().__init__()
        n = len(config.depths)
        self.layers = nn.LayerList([
            SwinStage(config, int(config.embed_dim * 2**i), config.depths[i], config.num_heads[i], downsample=i < n - 1)
            for i in range(n)])

    def forward(self, hidden_states, input_dimensions):
        for stage in self.layers:
            hidden_states, _, _ = stage(hidden_states, input_dimensions)
            if stage.downsample is not None:
                input_dimensions = ((input_dimensions[0] + 1) // 2, (input_dimensions[1] + 1) // 2)
        return SwinEncoderOutput(last_hidden_state=hidden_states)


class SwinModel(nn.Layer):
    def __init__(self, config: SwinConfig):
        super().__init__()
        self.embeddings = SwinEmbeddings(config)
        self.encoder = SwinEncoder(config)
        self.layernorm = nn.LayerNorm(config.num_features, epsilon=config.layer_norm_eps)
        self.pooler = nn.AdaptiveAvgPool1D(1)

    def forward(self, pixel_values):
        embeddings, dims = self.embeddings(pixel_values)
        sequence_output = self.layernorm(self.encoder(embeddings, dims).last_hidden_state)  # (B, L, C)
        pooled = self.pooler(sequence_output.transpose([0, 2, 1])).flatten(1)  # the mean over L
        return SwinModelOutput(last_hidden_state=sequence_output, pooler_output=pooled)


class SwinForImageClassification(nn.Layer):
    def __init__(self, config: SwinConfig):
        super().__init__()
        self.config = config
        self.swin = SwinModel(config)
        self.classifier = nn.Linear(config.num_features, config.num_labels) if config.num_labels > 0 else nn.Identity()

    def forward(self, pixel_values, labels=None):
        logits = self.classifier(self.swin(pixel_values).pooler_output)
        loss = None
        if labels is not None:
            loss = image_classification_loss(labels, logits, self.config.num_labels, self.config.problem_type)
        return SwinImageClassifierOutput(loss=loss, logits=logits)


__all__ = ["SwinConfig", "SwinForImageClassification", "SwinModel", "shifted_window_mask", "window_partition"]
