from ports.phi3.modeling import Phi3Config, Phi3ForCausalLM, Phi3Model

__all__ = ["Phi3Config", "Phi3ForCausalLM", "Phi3Model"]
