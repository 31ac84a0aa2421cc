from ports.bert.modeling import BertConfig, BertModel

__all__ = ["BertConfig", "BertModel"]
