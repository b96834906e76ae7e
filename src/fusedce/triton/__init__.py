"""Triton kernels for cross-entropy, log-probabilities and entropy on materialised logits.

Same math as :mod:`fusedce.spec` (per row, z = softcap * tanh(s * x / softcap) or s * x,
lse = log sum_j exp(z_j), statistics m, s, z_t, sum w z, argmax, sum exp(z - m) z that
combine associatively). One kernel family per module, each with its launchers and
torch.library ops: :mod:`~fusedce.triton.stats` (statistics), :mod:`~fusedce.triton.grad`
(gradient from statistics, scaling), :mod:`~fusedce.triton.fused` (statistics, loss and
gradient in one kernel), :mod:`~fusedce.triton.fused_tp` (its vocabulary-parallel forms),
:mod:`~fusedce.triton.targets` (the target scan: the range check's extremes and the mean's
count);
:mod:`~fusedce.triton.common` holds the shared @triton.jit helpers,
:mod:`~fusedce.triton.configs` the launch tables, :mod:`~fusedce.triton.launch` the launchers
and op registration, and :mod:`~fusedce.triton.backend` the backend protocol used by
:mod:`fusedce.autograd`.
"""
