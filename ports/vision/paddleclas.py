"""PaddleClas's own backbones as align ports: the model code is theirs (paddleclas 2.6.0,
`ppcls.arch.backbone`), only the configs and the call are adapted.

paddleclas 2.6.0 pins numpy < 2 and an older opencv, so these run in their own environment
(.venv-paddleclas, `make venv-paddleclas`), against a trace of the torch reference.

What the adapters do, and nothing more:
- build each backbone from the reference config's values (transformers' names mapped to
  PaddleClas's keyword arguments);
- take the image as transformers' models do, by the keyword `pixel_values`, and return the
  backbone's logits by name (`logits`), so the root's output pairs with the reference's.
  PaddleClas computes its loss outside the model, so these are aligned on their logits.
  Its CLIP is an image tower only: aligned on its image embeddings (`image_embeds`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import paddle
from paddleclas.ppcls.arch.backbone.legendary_models.swin_transformer import SwinTransformer
from paddleclas.ppcls.arch.backbone.model_zoo import foundation_vit
from paddleclas.ppcls.arch.backbone.model_zoo.vision_transformer import VisionTransformer


@dataclass
class ImageClassifierOutput:
    logits: paddle.Tensor


@dataclass
class ImageEmbeddings:
    image_embeds: paddle.Tensor


class _Values:
    """A reference config's values, kept as given (transformers' to_dict())."""

    def __init__(self, values: dict[str, Any]):
        self.values = dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> _Values:
        return cls(values)


class ViTConfig(_Values):
    pass


class SwinConfig(_Values):
    pass


class CLIPVisionConfig(_Values):
    pass


def _num_labels(v: dict[str, Any]) -> int:
    return len(v["id2label"]) if v.get("id2label") else v.get("num_labels", 2)


class ViTForImageClassification(VisionTransformer):
    """PaddleClas's VisionTransformer built from a transformers ViTConfig."""

    def __init__(self, config: ViTConfig):
        v = config.values
        super().__init__(img_size=v["image_size"], patch_size=v["patch_size"], in_chans=v["num_channels"],
                         class_num=_num_labels(v), embed_dim=v["hidden_size"], depth=v["num_hidden_layers"],
                         num_heads=v["num_attention_heads"], mlp_ratio=v["intermediate_size"] / v["hidden_size"],
                         qkv_bias=v.get("qkv_bias", True), epsilon=v["layer_norm_eps"])

    def forward(self, pixel_values):
        return ImageClassifierOutput(logits=super().forward(pixel_values))


class SwinForImageClassification(SwinTransformer):
    """PaddleClas's SwinTransformer built from a transformers SwinConfig."""

    def __init__(self, config: SwinConfig):
        v = config.values
        super().__init__(img_size=v["image_size"], patch_size=v["patch_size"], in_chans=v["num_channels"],
                         class_num=_num_labels(v), embed_dim=v["embed_dim"], depths=list(v["depths"]),
                         num_heads=list(v["num_heads"]), window_size=v["window_size"], mlp_ratio=v["mlp_ratio"],
                         qkv_bias=v["qkv_bias"], drop_path_rate=v["drop_path_rate"],
                         ape=v["use_absolute_embeddings"])

    def forward(self, pixel_values):
        return ImageClassifierOutput(logits=super().forward(pixel_values))


class SwinClampedForImageClassification(SwinForImageClassification):
    """PaddleClas's Swin with the one change its blocks lack, to show it is the whole finding:
    a block whose map is no larger than its window has nothing to shift across (the original
    Swin and transformers set its shift to 0; PaddleClas 2.6.0 shifts and masks the one window)."""

    def __init__(self, config: SwinConfig):
        super().__init__(config)
        for stage in self.layers:
            for block in stage.blocks:
                if min(block.input_resolution) <= block.window_size:
                    block.shift_size = 0


class CLIPVisionModelWithProjection(foundation_vit.VisionTransformer):
    """PaddleClas's CLIP image tower (foundation_vit.VisionTransformer) built from a transformers
    CLIPVisionConfig, as its own CLIP_vit_base_patch32_224 builds it: the model name picks
    CLIP's rows of the module's variant tables (LayerNorm before the encoder, [CLS] pooling);
    hugging_face_framework and return_embed as PaddleClas's CLIP configs set them, so the
    pooled [CLS] is normed and multiplied by `proj`."""

    def __init__(self, config: CLIPVisionConfig):
        v = config.values
        super().__init__(model_name="CLIP_vit_base_patch32_224", img_size=v["image_size"], patch_size=v["patch_size"],
                         in_chans=v["num_channels"], embed_dim=v["hidden_size"], output_dim=v["projection_dim"],
                         depth=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
                         mlp_ratio=v["intermediate_size"] / v["hidden_size"], qkv_bias=True,
                         epsilon=v["layer_norm_eps"], hugging_face_framework=True, return_embed=True)

    def forward(self, pixel_values):
        return ImageEmbeddings(image_embeds=super().forward(pixel_values))


__all__ = ["CLIPVisionConfig", "CLIPVisionModelWithProjection", "SwinClampedForImageClassification", "SwinConfig", "SwinForImageClassification", "ViTConfig", "ViTForImageClassification"]
