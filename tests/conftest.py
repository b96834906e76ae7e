"""Test session setup: run Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before any Triton kernel module is imported, so it is set
here, at collection start.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # fresh inputs per test, reproducible from the test id
    torch.manual_seed(hash(request.node.nodeid) % (2**31))
    yield
