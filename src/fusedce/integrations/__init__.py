"""Integrations of fusedce with training frameworks (optional dependencies).

    fusedce.integrations.transformers   Hugging Face transformers: causal_lm_loss (a drop-in
                                        for ForCausalLMLoss) and apply(model), which computes
                                        a causal LM's training loss with
                                        fusedce.linear_cross_entropy, never building logits.

Each submodule imports its framework lazily, so importing fusedce never needs them.
"""

__all__ = ["transformers"]
