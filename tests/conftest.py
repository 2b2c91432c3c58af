"""Shared test fixtures: the real data in ../shared and the Debian tools the tests drive."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qsmnode import compat
from qsmnode.demo.pacs import Orthanc

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("QSMNODE_SHARED", REPO.parent / "shared")) / "data"


LONGEST_FIRST = ("test_viewer_ohif.py", "test_fresh_clone.py", "test_node_e2e.py",
                 "test_faults.py")
"""Modules holding the suite's longest tests (3-6 minutes each), run first. ``-n 3 --dist
worksteal`` gives each worker a contiguous part of the collection and lets an idle worker
take queued tests from the other, never a running one: a long test left at the end of a part
ran alone while the other workers sat idle."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules of :data:`LONGEST_FIRST` first, in that order; every module's tests stay
    together and in their order (their module fixtures are made once per worker)."""
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the rest keeps the collection order


@pytest.fixture(scope="session", autouse=True)
def library_tweaks() -> None:
    """What the start-up installs (:func:`qsmnode.compat.install`: highdicom's memoised IOD
    look-up), once per test process, as ``qsmnode`` and the worker child do."""
    compat.install()


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


@pytest.fixture
def nodes() -> Iterator[list[Any]]:
    """Nodes (``tests.nodeutil.Node``) made by a test are killed at its end, whatever
    happened."""
    made: list[Any] = []
    yield made
    for node in made:
        node.close()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """Debian's Orthanc, made but not started (a test starts it when the PACS should be up)."""
    require_tool("Orthanc", "orthanc")
    server = Orthanc(tmp_path / "orthanc")
    yield server
    server.kill()



@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Any]:
    """A real Dask cluster on loopback (``tests.daskutil.Cluster``): a scheduler and two
    one-thread workers, stopped at the test's end."""
    from tests.daskutil import start_cluster

    yield from start_cluster(tmp_path)
