"""The package as a user installs it: the wheel holds every subpackage, the shipped configs, the LICENSE and
the ``lightning-ood`` console script; shipped configs are found from any directory; the main classes are
exported; ``python -m lightning_ood`` and ``train.py fit`` work."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import lightning_ood
from lightning_ood.cli import _prepare_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the source tree (so the checkout gets no build/ folder)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("lightning_ood", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(out),
        str(src),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return next(out.glob("lightning_ood-*.whl"))


def test_wheel_holds_packages_configs_license_and_console_script(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(p.relative_to(ROOT)) for p in (ROOT / "lightning_ood").rglob("__init__.py")}
    assert packages <= names
    data = {
        str(p.relative_to(ROOT)) for p in (ROOT / "lightning_ood").rglob("*.json")
    }  # e.g. the leaderboard
    assert data and data <= names
    configs = {f"lightning_ood/{p.relative_to(ROOT)}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert configs and configs <= names
    dist = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert f"{dist}/licenses/LICENSE" in names
    archive = zipfile.ZipFile(wheel)
    assert "Apache License" in archive.read(f"{dist}/licenses/LICENSE").decode()
    assert "License-Expression: Apache-2.0" in archive.read(f"{dist}/METADATA").decode()
    scripts = archive.read(f"{dist}/entry_points.txt").decode()
    assert "[console_scripts]\nlightning-ood = lightning_ood.__main__:main" in scripts


def test_installed_package_finds_its_shipped_configs_from_anywhere(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "from lightning_ood.shipped_configs import resolve_config_args as r; "
        "print(r(['--config', 'configs/quickstart.yaml', '--data=data/cifar10.yaml']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(
        [
            "--config",
            str(site / "lightning_ood/configs/quickstart.yaml"),
            f"--data={site}/lightning_ood/configs/data/cifar10.yaml",
        ]
    )


def test_python_m_lightning_ood_lists_its_commands():
    out = subprocess.run(
        [sys.executable, "-m", "lightning_ood", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0 and "lightning-ood {fit,test,score,compare}" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "lightning_ood", "train"], capture_output=True, text=True, cwd=ROOT
    )
    assert (
        bad.returncode == 2 and "unknown command 'train': use one of fit, test, score, compare" in bad.stderr
    )


def test_train_py_fit_and_shipped_configs_outside_the_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = _prepare_args(["fit", "--config", "configs/quickstart.yaml", "--trainer.max_epochs=1"], "train")
    assert args == ["--config", str(ROOT / "configs/quickstart.yaml"), "--trainer.max_epochs=1"]
    mine = tmp_path / "configs" / "quickstart.yaml"  # a user's own file of that name wins
    mine.parent.mkdir()
    mine.write_text("seed_everything: 1\n")
    assert _prepare_args(["--config", "configs/quickstart.yaml"], "train") == [
        "--config",
        "configs/quickstart.yaml",
    ]


def test_main_classes_are_exported():
    from lightning_ood.detectors import KNN
    from lightning_ood.methods import Classifier

    assert lightning_ood.KNN is KNN and lightning_ood.Classifier is Classifier
    assert all(getattr(lightning_ood, name) is not None for name in lightning_ood.__all__)
