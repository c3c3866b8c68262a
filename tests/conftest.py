"""Shared test fixtures."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def nan_new_empty(monkeypatch):
    """Every floating buffer the kernels' launchers allocate with ``new_empty`` starts as NaN, so an
    element a kernel forgets to write shows up in the result."""
    real_empty = torch.Tensor.new_empty

    def nan_empty(self, *size, **kw):
        out = real_empty(self, *size, **kw)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch.Tensor, "new_empty", nan_empty)


@pytest.fixture
def one_thread():
    """torch on one thread for the test: the small end-to-end runs are many times faster that way on
    a 2-core machine that other processes share."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
