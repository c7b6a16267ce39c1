"""What a person sees at set-up and in a default run: no warning the project can prevent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_license_is_an_spdx_string():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    # A TOML table here makes setuptools print its deprecation box at every install.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"


def test_deepspeed_picks_the_cpu_accelerator_without_its_warning():
    code = (
        "from kto_ray import console; console.configure(False)\n"
        "from deepspeed.accelerator import get_accelerator\n"
        "print(get_accelerator()._name)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "KTO_RAY_VERBOSE")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.splitlines()[-1] == "cpu"
    assert "Setting accelerator to CPU" not in done.stdout + done.stderr


def test_verbose_leaves_deepspeed_to_detect_and_warn():
    code = (
        "from kto_ray import console; console.configure(True)\n"
        "from deepspeed.accelerator import get_accelerator\n"
        "print(get_accelerator()._name)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.splitlines()[-1] == "cpu"
    assert "Setting accelerator to CPU" in done.stdout + done.stderr  # DeepSpeed prints it to stdout
