"""Package layout: the deploy side imports without torch, and the console script works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import advedge

ROOT = Path(__file__).resolve().parents[1]


def test_deploy_side_is_torch_free_at_import():
    code = (
        "import sys, advedge.export, advedge.calibration; "
        "bad = [m for m in ('torch', 'torchvision') if m in sys.modules]; "
        "print(advedge.export.__file__); print(advedge.calibration.__file__); "
        "sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    export_file, calibration_file = out.stdout.split()
    # package-dir maps the top-level folders into the advedge namespace
    assert Path(export_file).parent == ROOT / "export"
    assert Path(calibration_file).parent == ROOT / "calibration"


def test_no_generic_top_level_packages_installed():
    code = "import importlib.util as u, sys; sys.exit(bool(u.find_spec('calibration') or u.find_spec('export')))"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", check=False)
    assert out.returncode == 0


def test_python_dash_m_and_version():
    out = subprocess.run(
        [sys.executable, "-m", "advedge", "--version"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0
    assert out.stdout.strip() == f"advedge {advedge.__version__}"


def test_torchvision_is_not_required():
    code = (
        "import sys; sys.modules['torchvision'] = None; "
        "import advedge.cli, advedge.training.engine, advedge.evaluation, advedge.models, advedge.data"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


def test_every_subpackage_is_listed_for_the_wheel():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        ".".join((name, *init.parent.relative_to(ROOT / path).parts))
        for name, path in config["package-dir"].items()
        for init in (ROOT / path).rglob("__init__.py")
    }
    assert found == set(config["packages"])


def test_readme_method_table_is_the_official_recipes():
    from advedge.training.official import markdown_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown_table() in readme, "regenerate the README table from markdown_table()"
