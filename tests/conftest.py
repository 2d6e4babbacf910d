"""Loads every fixture module under tests/fixtures/ so each area keeps its fixtures in one file."""

import pkgutil
from pathlib import Path

pytest_plugins = [
    f"tests.fixtures.{module.name}"
    for module in pkgutil.iter_modules([str(Path(__file__).parent / "fixtures")])
]
