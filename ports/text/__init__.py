"""The text family: transformers' text models (Gemma2, Phi3, ModernBERT, BERT) ported by hand,
and PaddleFormers' own ports adapted (paddleformers.py, in its own environment)."""
