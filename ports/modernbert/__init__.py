from ports.modernbert.modeling import ModernBertConfig, ModernBertForMaskedLM, ModernBertModel

__all__ = ["ModernBertConfig", "ModernBertForMaskedLM", "ModernBertModel"]
