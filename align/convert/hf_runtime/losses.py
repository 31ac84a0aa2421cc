"""Losses with torch's reduction semantics.

`paddle.nn.functional.cross_entropy(..., ignore_index=-100, reduction="mean")` divides by ALL
tokens: Paddle leaves ignored labels out of the mean only when ignore_index >= 0. Torch
divides by the tokens that are not ignored. HF's default ignore_index is -100, so a converted
loss is silently too small (and its gradients too) wherever a label is ignored: padding,
unmasked tokens of a masked LM, the shifted-out last position.
"""

from __future__ import annotations

import paddle
import paddle.nn.functional as F


def cross_entropy(input: paddle.Tensor, target: paddle.Tensor | None = None, weight: paddle.Tensor | None = None,
                  ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0, *,
                  label: paddle.Tensor | None = None) -> paddle.Tensor:
    """torch.nn.functional.cross_entropy for class-index targets: logits [N, C], labels [N].
    The targets may come as `label`, Paddle's name for them, which PaConvert's draft uses."""
    if (target is None) == (label is None):
        raise TypeError("cross_entropy takes the targets once, as target (torch) or label (Paddle)")
    target = label if target is None else target
    if weight is not None or label_smoothing:
        raise NotImplementedError("cross_entropy with class weights or label smoothing is not supported")
    keep = target != ignore_index
    # A safe class index where the label is ignored; those terms are zeroed below.
    safe = paddle.where(keep, target, paddle.zeros_like(target))
    logp = F.log_softmax(input, axis=-1)
    picked = paddle.take_along_axis(logp, safe.unsqueeze(-1), axis=-1).squeeze(-1)
    losses = -picked * keep.astype(picked.dtype)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        # Torch: the sum over kept tokens divided by their count (NaN when none is kept).
        return losses.sum() / keep.astype(picked.dtype).sum()
    raise ValueError(f"unknown reduction {reduction!r}")


class CrossEntropyLoss(paddle.nn.Layer):
    """torch.nn.CrossEntropyLoss (class-index targets) on top of `cross_entropy`."""

    def __init__(self, weight=None, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0):
        super().__init__()
        self.weight, self.ignore_index, self.reduction, self.label_smoothing = weight, ignore_index, reduction, label_smoothing

    def forward(self, input: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
        return cross_entropy(input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing)


def fixed_cross_entropy(source: paddle.Tensor, target: paddle.Tensor, num_items_in_batch=None,
                        ignore_index: int = -100, **kwargs) -> paddle.Tensor:
    """HF's: a mean over kept tokens, or a sum divided by `num_items_in_batch` when given."""
    if num_items_in_batch is None:
        return cross_entropy(source, target, ignore_index=ignore_index, reduction="mean")
    return cross_entropy(source, target, ignore_index=ignore_index, reduction="sum") / num_items_in_batch


def causal_lm_loss(logits: paddle.Tensor, labels: paddle.Tensor, vocab_size: int, num_items_in_batch=None,
                   ignore_index: int = -100, shift_labels: paddle.Tensor | None = None, **kwargs) -> paddle.Tensor:
    """Logits at t scored against labels at t + 1; the last position has no label."""
    logits = logits.astype("float32")  # HF upcasts before the loss
    if shift_labels is None:
        pad = paddle.full([*labels.shape[:-1], 1], ignore_index, dtype=labels.dtype)
        shift_labels = paddle.concat([labels[..., 1:], pad], axis=-1)
    return fixed_cross_entropy(logits.reshape([-1, vocab_size]), shift_labels.reshape([-1]), num_items_in_batch,
                               ignore_index)


def masked_lm_loss(logits: paddle.Tensor, labels: paddle.Tensor, vocab_size: int, num_items_in_batch=None,
                   ignore_index: int = -100, **kwargs) -> paddle.Tensor:
    logits = logits.astype("float32")
    return fixed_cross_entropy(logits.reshape([-1, vocab_size]), labels.reshape([-1]), num_items_in_batch,
                               ignore_index)


def sequence_classification_loss(labels: paddle.Tensor, pooled_logits: paddle.Tensor, config, **kwargs) -> paddle.Tensor:
    """HF's ForSequenceClassificationLoss (image classifiers use it too). Without a problem_type:
    one label is regression; more, with integer labels, single-label cross-entropy; anything
    else, multi-label. Decided on every call: transformers writes its first decision into the
    config, which then sticks."""
    num_labels, problem_type = config.num_labels, config.problem_type
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif num_labels > 1 and labels.dtype in (paddle.int64, paddle.int32):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(pooled_logits.squeeze(), labels.squeeze().astype(pooled_logits.dtype))
        return F.mse_loss(pooled_logits, labels.astype(pooled_logits.dtype))
    if problem_type == "single_label_classification":
        return fixed_cross_entropy(pooled_logits.reshape([-1, num_labels]), labels.reshape([-1]), **kwargs)
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(pooled_logits, labels.astype(pooled_logits.dtype))
    raise ValueError(f"invalid problem_type {problem_type!r}")


# A model class name containing the key uses that loss (HF's LOSS_MAPPING convention).
LOSS_MAPPING = {"ForCausalLM": causal_lm_loss, "ForMaskedLM": masked_lm_loss,
                "ForImageClassification": sequence_classification_loss,
                "ForSequenceClassification": sequence_classification_loss}
