"""Shared test configuration: hypothesis profiles, one torch thread.

``ci`` (default): no deadline (CI machines are slow and shared), moderate example counts set per
test.  ``long``: ten times more examples, for soundness sweeps; select it with
``python -m pytest --hypothesis-profile=long`` or ``SMOOTHCHAIN_PROFILE=long``.
"""

import os

import pytest

from hypothesis import HealthCheck, settings

settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "long", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=2000
)
settings.load_profile(os.environ.get("SMOOTHCHAIN_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread for the whole suite: the tests use tiny tensors, for which threads
    only add synchronisation (up to 5x slower on a loaded 2-core machine); restored after."""
    try:
        import torch
    except ImportError:  # the torch-free parts of the suite
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
