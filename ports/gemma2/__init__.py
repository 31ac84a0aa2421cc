from ports.gemma2.modeling import Gemma2Config, Gemma2ForCausalLM, Gemma2Model

__all__ = ["Gemma2Config", "Gemma2ForCausalLM", "Gemma2Model"]
