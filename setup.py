"""Packaging detail: `common/` and `services/` install as `tokenmill.common` and `tokenmill.services`.

The top-level folders are part of the project's specification, but an install must add no top-level
module except `tokenmill` (tokenmill/__init__.py explains the source-checkout side). Everything else
about the distribution is in pyproject.toml.
"""

from setuptools import find_packages, setup

MAPPED_ROOTS = ("common", "services")

packages = ["tokenmill", "tokenmill.v1"]
package_dir = {"tokenmill": "tokenmill"}
for root in MAPPED_ROOTS:
    package_dir[f"tokenmill.{root}"] = root
    packages += [f"tokenmill.{name}" for name in find_packages(include=[root, f"{root}.*"])]

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"tokenmill.common.jobs": ["lua/*.lua"], "tokenmill.common.eval": ["suites/*/*"]},
)
