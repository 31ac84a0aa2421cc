"""The vision family: references are transformers' (and timm's) image models, named in
align.toml by `class` and `config_class` and fed images (kind = "image"). What lives here is
what they need beyond that:
- captions for the image-text models (`captions`): token ids as a CLIP tokenizer lays them out;
- timm's ViT built from a transformers ViTConfig's values (`timm_vit`), a second reference for
  the same port;
- CLIP's image tower answering with its image embeddings alone (`clip_image_tower`), the one
  output of an image-only port such as PaddleClas's."""

from __future__ import annotations

from typing import Any

import numpy as np


def captions(ctx: Any, batch: int, lengths: list[int], seq_len: int | None = None,
             config: str = "text_config") -> dict[str, np.ndarray]:
    """Token ids as CLIP's tokenizer pads a batch (an input builder, kind = "builder"): each
    caption is bos, random tokens and eos, `lengths[i]` tokens in all, then padding to the
    longest (or to `seq_len`) with pad_token_id; and the attention mask, 1 on the caption.
    The ids come from the text config (`config`, a key of the model's config): random tokens
    avoid bos, eos and pad, so the eos each caption ends with is the first."""
    text = ctx.config.get(config)
    if not isinstance(text, dict):
        raise ctx.fail("captions", f"the model's config has no {config!r} table")
    vocab, special = text["vocab_size"], [text.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")]
    bos, eos, pad = special
    if not isinstance(lengths, list) or len(lengths) != batch or not all(isinstance(n, int) and n >= 2 for n in lengths):
        raise ctx.fail("captions.args.lengths", f"expected {batch} integers >= 2 (bos and eos), got {lengths!r}")
    T = seq_len or max(lengths)
    if max(lengths) > T:
        raise ctx.fail("captions.args.seq_len", f"{T} is shorter than the longest caption ({max(lengths)})")
    ordinary = np.setdiff1d(np.arange(vocab), [s for s in special if s is not None])
    ids = np.full((batch, T), pad, dtype=np.int64)
    mask = np.zeros((batch, T), dtype=np.int64)
    for i, n in enumerate(lengths):
        ids[i, 0], ids[i, n - 1] = bos, eos
        ids[i, 1:n - 1] = ctx.rng.choice(ordinary, size=n - 2)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def timm_vit(image_size: int, patch_size: int, num_channels: int, hidden_size: int, num_hidden_layers: int,
             num_attention_heads: int, intermediate_size: int, num_labels: int, hidden_act: str = "gelu",
             layer_norm_eps: float = 1e-12, qkv_bias: bool = True, hidden_dropout_prob: float = 0.0,
             attention_probs_dropout_prob: float = 0.0) -> Any:
    """timm's VisionTransformer (a reference builder) from a transformers ViTConfig's values,
    so one config table builds both references of a ViT port: [CLS] pooling, pre-norm blocks,
    exact GELU (timm's nn.GELU, transformers' "gelu"), LayerNorm at the config's epsilon."""
    from functools import partial

    import torch
    from timm.models.vision_transformer import VisionTransformer

    if hidden_act != "gelu":
        raise ValueError(f"timm's ViT block uses exact GELU; hidden_act {hidden_act!r} has no timm counterpart")
    return VisionTransformer(img_size=image_size, patch_size=patch_size, in_chans=num_channels, num_classes=num_labels,
                             embed_dim=hidden_size, depth=num_hidden_layers, num_heads=num_attention_heads,
                             mlp_ratio=intermediate_size / hidden_size, qkv_bias=qkv_bias,
                             norm_layer=partial(torch.nn.LayerNorm, eps=layer_norm_eps),
                             proj_drop_rate=hidden_dropout_prob, attn_drop_rate=attention_probs_dropout_prob)


def clip_image_tower(**values: Any) -> Any:
    """transformers' CLIPVisionModelWithProjection (a reference builder: its module and tensor
    names unchanged) whose forward returns only `image_embeds`: the last hidden state it also
    returns is not an output of an image tower that ends in the projection."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers.models.clip.modeling_clip import CLIPVisionModelOutput

    class ImageEmbeddings(CLIPVisionModelWithProjection):
        def forward(self, pixel_values):
            return CLIPVisionModelOutput(image_embeds=super().forward(pixel_values=pixel_values).image_embeds)

    # eager attention: the softmax(QK^T)V the port writes out, not a fused kernel
    return ImageEmbeddings(CLIPVisionConfig(**{"attn_implementation": "eager", **values}))
