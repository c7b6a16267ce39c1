"""Fixtures and helpers of the reference store's tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private digest cache folder for the test (never the user's)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("KTO_RAY_CACHE", str(folder))
    return folder


def set_mtime(path: Path, seconds: float) -> None:
    os.utime(path, ns=(int(seconds * 1e9), int(seconds * 1e9)))
