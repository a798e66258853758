"""The project as pip installs it (not editable): the library, the app's package and the demo family."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # a fresh virtual environment and an install: ~20 s


def test_an_installed_package_finds_the_demo_family_and_the_app(tmp_path):
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    # this environment's pip and setuptools build a wheel, offline (installing into another prefix from
    # here would first uninstall this environment's own editable copy); the fresh environment installs it
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(tmp_path / "wheels"), str(ROOT)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "wheels").glob("*.whl")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    # the dependencies from this environment, the project only from the install (no .pth of an editable one)
    deps = sysconfig.get_paths()["purelib"]
    probe = (
        "import residuals_core, studio.ui; from residuals_core.demo import DEMO_FAMILY, demo_model; "
        "print(residuals_core.__file__); print(DEMO_FAMILY); print(demo_model('demo:base-v1'))"
    )
    run = subprocess.run(
        [str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": deps},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    package, family, base = run.stdout.split()
    assert str(env_dir) in package and str(ROOT) not in package  # the installed copy, not this checkout
    assert str(env_dir) in family and (Path(base) / "model.safetensors").is_file()
    assert (Path(family) / "world.json").is_file()
