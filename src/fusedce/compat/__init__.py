"""Seed-compatible entry points: the names, signatures, defaults and results of the APIs
fusedce replaces, each a thin adapter over the one core (fusedce.cross_entropy / logprobs):

    fusedce.compat.transformer_engine  parallel_cross_entropy, CrossEntropyFunction,
                                        cross_entropy_forward, cross_entropy_backward
    fusedce.compat.nemo_automodel      TEParallelCrossEntropy, ChunkedCrossEntropy,
                                        compute_cross_entropy, _compiled_compute_cross_entropy,
                                        parallel_cross_entropy, CrossEntropyFunction,
                                        HAVE_TE_PARALLEL_CE, MISSING_TE_PARALLEL_CE_MSG
    fusedce.compat.nemo_rl             DistributedLogprob, from_parallel_logits_to_logprobs
                                        (the seed's group= and the current tp_group=,
                                        cp_group, chunk_size, sampling_params),
                                        ChunkedDistributedLogprob,
                                        ChunkedDistributedGatherLogprob,
                                        ChunkedDistributedEntropy,
                                        get_next_token_logprobs_from_logits,
                                        _compute_distributed_log_softmax
    fusedce.compat.torch_npu           npu_cross_entropy_loss (z-loss implemented)

The loss is the core's (docs/design.md): per row lse - z_t with label smoothing,
class weights and z-loss, fp32 math, gradient in the logits' dtype. Each module's
docstring lists where it deliberately differs from the original (no mutation of caller
tensors, no host syncs, uneven shards, z-loss implemented); docs/migration.md has the
one-line switch for each.
"""

from . import nemo_automodel, nemo_rl, torch_npu, transformer_engine

__all__ = ["transformer_engine", "nemo_automodel", "nemo_rl", "torch_npu"]
