"""Shared pytest fixtures (fixture *models* live in ``fxprune.models``)."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny float64 oracle nets: intra-op threads only add synchronisation (badly so on a
    loaded CPU). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
