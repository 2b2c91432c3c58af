"""Shared test fixtures: the real data in ../shared and the Debian tools the tests drive."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("QSMNODE_SHARED", REPO.parent / "shared")) / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real vendor samples in ../shared/data; skip with the reason where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set QSMNODE_SHARED)")
    return SHARED_DATA


def require_tool(program: str, package: str) -> str:
    """Path of a Debian tool the test needs. A missing tool fails the test, never skips it."""
    path = shutil.which(program)
    if path is None:
        pytest.fail(f"{program} is not installed: run `sudo apt-get install {package}`")
    return path


