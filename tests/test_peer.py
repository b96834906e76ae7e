"""fusedce.peer: when the in-kernel statistics exchange is used, and its epoch sequence.

The exchange itself (kernel side) is tested in tests/test_triton_kernels.py
(test_fused_loss_peer_exchange) and between GPUs in the NCCL suite of
tests/test_distributed.py (FUSEDCE_DIST_BACKEND=nccl, FUSEDCE_TP_EXCHANGE=symm).
"""

from __future__ import annotations

import torch

from fusedce import peer


def test_mode_parsing(monkeypatch):
    for val, want in (("", "auto"), ("auto", "auto"), ("SYMM", "symm"), (" nccl ", "nccl"),
                      ("bogus", "auto")):
        monkeypatch.setenv("FUSEDCE_TP_EXCHANGE", val)
        assert peer.mode() == want
    monkeypatch.delenv("FUSEDCE_TP_EXCHANGE")
    assert peer.mode() == "auto"


def test_not_used_off_cuda_or_without_group(monkeypatch):
    monkeypatch.setenv("FUSEDCE_TP_EXCHANGE", "symm")
    assert peer.exchange_for(None, torch.device("cpu"), 8) is None
    assert peer.exchange_for(object(), torch.device("cpu"), 8) is None
    monkeypatch.setenv("FUSEDCE_TP_EXCHANGE", "nccl")
    assert peer.exchange_for(object(), torch.device("cuda", 0), 8) is None


def test_epochs_never_zero_and_alternate_in_parity_across_the_wrap():
    ex = peer.PeerExchange(torch.zeros(1), torch.zeros(1), 0, 2, None)
    seq = [ex.next_epoch() for _ in range(5)]
    assert seq == [1, 2, 3, 4, 5]
    ex.calls = peer._EPOCHS - 2
    seq = [ex.next_epoch() for _ in range(4)]
    assert seq == [peer._EPOCHS - 1, peer._EPOCHS, 1, 2]
    assert all((a ^ b) & 1 for a, b in zip(seq, seq[1:]))
    assert all(0 < e < 2**31 for e in seq)
