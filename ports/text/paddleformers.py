"""PaddleFormers' own models as align ports: the model code is theirs, only configs are adapted.

paddleformers 1.2.0 needs transformers < 5.4 and switches torch off inside transformers when
imported, so these run in their own environment (.venv-paddleformers, `make
venv-paddleformers`), against a trace of the torch reference (`align trace`/`align check`).

What the adapters do:
- build each PaddleFormers config from the reference config's values, with the settings a
  CPU alignment needs: no fused RMSNorm kernel (it has no CPU kernel), no KV cache (its
  cache objects cannot be replayed), fp32;
- make `Qwen2ForCausalLMDeprecated` importable. paddleformers 1.2.0's qwen2/modeling.py
  imports `gpt_provider` unconditionally, and gpt_provider raises ImportError without
  paddlefleet, which is not on PyPI. The Deprecated class does not use it, so a placeholder
  module stands in for gpt_provider while qwen2 is imported (only if paddlefleet is absent).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from paddleformers.transformers import LlamaConfig as _LlamaConfig
from paddleformers.transformers import LlamaForCausalLM, Phi3ForCausalLM
from paddleformers.transformers import Phi3Config as _Phi3Config
from paddleformers.utils.import_utils import is_paddlefleet_available


def _import_qwen2():
    name = "paddleformers.transformers.gpt_provider"
    placeholder = None
    if not is_paddlefleet_available() and name not in sys.modules:
        placeholder = types.ModuleType(name)
        placeholder.GPTModelProvider = type("GPTModelProvider", (), {"__doc__": "placeholder: paddlefleet is absent"})
        sys.modules[name] = placeholder
    try:
        from paddleformers.transformers.qwen2.configuration import Qwen2Config
        from paddleformers.transformers.qwen2.modeling import Qwen2ForCausalLMDeprecated
    finally:
        if placeholder is not None and sys.modules.get(name) is placeholder:
            del sys.modules[name]
    return Qwen2Config, Qwen2ForCausalLMDeprecated


_Qwen2Config, Qwen2ForCausalLMDeprecated = _import_qwen2()

# What a CPU alignment needs, whatever the reference config says.
_ALIGNMENT_SETTINGS = {"fuse_rms_norm": False, "use_cache": False, "dtype": "float32"}


def _adapted(config_cls: type) -> type:
    class Adapted:
        @staticmethod
        def from_dict(values: dict[str, Any]) -> Any:
            values = dict(values)
            rope = values.get("rope_parameters") or {}
            # transformers 5.x keeps rope_theta inside rope_parameters; PaddleFormers reads it flat.
            if "rope_theta" in rope:
                values.setdefault("rope_theta", rope["rope_theta"])
            if "partial_rotary_factor" in rope:
                values.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
            return config_cls(**{**values, **_ALIGNMENT_SETTINGS})

    Adapted.__name__ = Adapted.__qualname__ = f"{config_cls.__name__}Adapter"
    return Adapted


LlamaConfig = _adapted(_LlamaConfig)
Qwen2Config = _adapted(_Qwen2Config)
Phi3Config = _adapted(_Phi3Config)

__all__ = ["LlamaConfig", "LlamaForCausalLM", "Phi3Config", "Phi3ForCausalLM", "Qwen2Config",
           "Qwen2ForCausalLMDeprecated"]
