"""Distillation tests work on tiny tensors: one thread, since on a small shared machine two OpenMP
threads competing with other processes make these small ops tens of times slower."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
