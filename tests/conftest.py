"""Loads every fixture module under tests/fixtures/ so each area keeps its fixtures in one file,
and sets the Hypothesis profile the property-based tests run under."""

import os
import pkgutil
from pathlib import Path

from hypothesis import HealthCheck, settings

pytest_plugins = [
    f"tests.fixtures.{module.name}"
    for module in pkgutil.iter_modules([str(Path(__file__).parent / "fixtures")])
]

# Property tests drive real Redis servers and engines: no per-example deadline (a loaded CI machine
# is slow, not wrong), and a fixed seed in CI so a red run reproduces. `make test-fast` uses the
# `fast` profile (fewer examples); `HYPOTHESIS_PROFILE=explore` searches further from a fresh seed.
settings.register_profile(
    "ci", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("fast", parent=settings.get_profile("ci"), max_examples=20)
settings.register_profile(
    "explore", deadline=None, max_examples=500, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
