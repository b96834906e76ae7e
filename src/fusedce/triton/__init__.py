"""Triton kernels for cross-entropy, log-probabilities and entropy on materialised logits.

Same math as :mod:`fusedce.spec` (per row, z = softcap * tanh(s * x / softcap) or s * x,
lse = log sum_j exp(z_j), statistics m, s, z_t, sum w z, argmax, sum exp(z - m) z that
combine associatively). :mod:`fusedce.triton.ce` holds the kernels and their launchers
(registered as torch.library custom ops), :mod:`fusedce.triton.backend` the backend
protocol used by :mod:`fusedce.autograd`.
"""
