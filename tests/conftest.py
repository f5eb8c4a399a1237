"""The suite runs on the CPU, as CI does, also on a machine with GPUs.

Training on a GPU changes what the tests compare (bf16 autocast under ``train.precision: auto``,
non-deterministic kernels) and the 2-process tests would put both ranks on one GPU, which NCCL
refuses. So CUDA is hidden from the test session and from every process its tests launch, unless
``CMPT_TEST_DEVICE=cuda``: the GPU checks (the tests that skip without CUDA, e.g.
``tests/test_cuda_train.py``; ``benchmarks/device_session.sh`` runs them) are run that way.
"""

from __future__ import annotations

import os

import pytest

_DEVICE = os.environ.get("CMPT_TEST_DEVICE", "cpu")
if _DEVICE not in ("cpu", "cuda"):
    raise pytest.UsageError(f"CMPT_TEST_DEVICE={_DEVICE!r}: use 'cpu' (the default) or 'cuda'")
if _DEVICE == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initialises CUDA


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny tensors, where thread start-up and contention on a shared
    machine would dominate (files use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
