"""A stand-in eager backend for tests: the Triton backend's strategy (statistics and the
gradient in the forward, ``fused``; the backward only scales) built from the torch backend,
so that the eager code paths of autograd.py and linear.py run on every machine."""

from __future__ import annotations

import types

from fusedce import autograd as fce_autograd
from fusedce import spec, torch_backend


def _fused(x3, target, opts, *, g0, terms, vocab_size, out, weight_local):
    st = torch_backend.row_stats(x3, target, opts, weight_local=weight_local,
                                 need_sz=opts.label_smoothing > 0.0)
    lse = spec.lse_of(st)
    c_p, c_t = spec.grad_coefficients(lse, terms, opts, vocab_size)
    torch_backend.grad(x3, target, st.m, st.s, g0, c_p, c_t, opts, vocab_size=vocab_size, out=out,
                       weight_local=weight_local)
    return st


def make(name: str = "eager") -> types.SimpleNamespace:
    """A backend namespace named ``name`` with eager_grad and supports_fused set."""
    return types.SimpleNamespace(
        name=name, eager_grad=True, supports_fused=True, row_stats=torch_backend.row_stats,
        grad=torch_backend.grad, fused=_fused, scale_=fce_autograd.scale_,
        scale_rows_=fce_autograd.scale_rows_)
