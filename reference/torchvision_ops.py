"""torchvision's Python code, importable where its compiled ops cannot load.

timm imports torchvision (FrozenBatchNorm2d, its data transforms: pure Python). The one
torchvision built for torch 2.13 on the registries this project installs from, 0.28.0, is a
CUDA build: its `_C.so` links libtorch_cuda and does not load on the CPU torch, and the package
then dies at import ("operator torchvision::nms does not exist"), because its fake-tensor
registrations name ops that `_C.so` would have declared. transformers imports it too, for some
of its models, once it is installed.

`declare()` declares those ops' schemas (the ones torchvision 0.28.0 registers, read from its
`_C.so`) with no kernel, when and only when its `_C.so` does not load: the Python package then
imports, and calling one of the ops raises torchvision's own "Couldn't load custom C++ ops".
A torchvision whose library loads is left alone. `make venv` runs it at interpreter start
(a .pth file) so that no import order matters; nothing else in torch or torchvision changes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "SymInt batch_size, SymInt channels, SymInt height, SymInt width, int sampling_ratio, bool aligned) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, "
    "SymInt width) -> Tensor",
    "qroi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, "
    "SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, "
    "SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
    "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, "
    "SymInt groups, SymInt offset_groups, bool use_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)

_library = None  # the declaring torch.library.Library: it must live as long as the process
_checked = False


def _compiled_ops() -> Path | None:
    """torchvision's `_C.so`, if torchvision is installed and has one."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("_C*.so"))
    return found[0] if found else None


def declare() -> bool:
    """Declare torchvision's op schemas if its compiled library is there and cannot load;
    whether they were declared (False: no torchvision, or a working one, or done already)."""
    global _library, _checked
    if _checked:
        return False
    _checked = True  # before find_spec below, which comes back through _BeforeTorchvision
    library = _compiled_ops()
    if library is None:
        return False
    import torch

    try:
        torch.ops.load_library(str(library))
        return False
    except OSError:
        pass
    _library = torch.library.Library("torchvision", "DEF")
    for schema in SCHEMAS:
        _library.define(schema)
    return True


class _BeforeTorchvision:
    """An import finder that finds nothing: the first time torchvision is looked for, it
    declares the ops, then the ordinary finders load it (a process that never imports
    torchvision never imports torch for it)."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "torchvision" and not _checked:
            declare()
        return None


def install() -> None:
    """What the venv's .pth runs at interpreter start."""
    import sys

    if _BeforeTorchvision not in sys.meta_path:
        sys.meta_path.insert(0, _BeforeTorchvision)
