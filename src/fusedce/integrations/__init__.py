"""Integrations of fusedce with training frameworks (optional dependencies).

    fusedce.integrations.transformers   Hugging Face transformers (and PEFT): apply(model),
                                        revert(model), patch() for every family, computing a
                                        causal LM's training loss with
                                        fusedce.linear_cross_entropy, never building logits.
    fusedce.integrations.trl            TRL's trainers: their log-probs and entropy through
                                        fusedce.linear_logprobs (apply(trainer), patch()).

Each submodule imports its framework lazily, so importing fusedce never needs them.
"""

__all__ = ["transformers", "trl"]
