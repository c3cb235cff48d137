"""Build glue that pyproject.toml cannot express: the repository's ``configs/`` folder is shipped inside the
package as ``lightning_ood/configs`` (package data), so ``lightning-ood fit --config quickstart.yaml`` works
from an installed wheel without a second copy of the configs in git. Everything else is in pyproject.toml."""

from setuptools import find_namespace_packages, find_packages, setup

configs = [
    "lightning_ood.configs",
    *(f"lightning_ood.configs.{p}" for p in find_namespace_packages(where="configs")),
]

setup(
    packages=[*find_packages(include=["lightning_ood", "lightning_ood.*"]), *configs],
    package_dir={"lightning_ood.configs": "configs"},
    package_data={**{name: ["*.yaml"] for name in configs}, "lightning_ood.leaderboard": ["*.json"]},
)
