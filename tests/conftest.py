"""Shared test configuration: hypothesis profiles.

``ci`` (default): no deadline (CI machines are slow and shared), moderate example counts set per
test.  ``long``: ten times more examples, for soundness sweeps; select it with
``python -m pytest --hypothesis-profile=long`` or ``SMOOTHCHAIN_PROFILE=long``.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "long", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=2000
)
settings.load_profile(os.environ.get("SMOOTHCHAIN_PROFILE", "ci"))
