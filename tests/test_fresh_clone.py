"""The README's commands work from a fresh clone with no virtual environment present."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from qsmnode.sim.vendor_dicom import SimStudyInfo
from tests.conftest import REPO, require_tool
from tests.orthanc import Orthanc

pytestmark = pytest.mark.slow


def test_make_demo_from_a_fresh_clone(tmp_path: Path) -> None:
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout: nothing to clone")
    require_tool("Orthanc", "orthanc")
    clone = tmp_path / "qsmnode"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    assert not (clone / ".venv").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    report = tmp_path / "demo.json"
    demo = subprocess.run(
        ["make", "demo", f"DEMO_ARGS=--size small-slab --report-json {report}"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    out = clone / "demo-output"
    assert len(list((out / "scanner").rglob("*.dcm"))) == 48 * 4 * 2
    assert "left_hand   deep" in demo.stdout and "right_foot  all" in demo.stdout
    assert "total: last image received → last object acknowledged" in demo.stdout
    assert sorted(p.name for p in (out / "key-images").iterdir()) == [
        "key-image-1.png", "key-image-2.png"]
    summary = json.loads(report.read_text())
    assert summary["result"]["m1"]["measurements"] and "error" not in summary["result"]["m1"]

    # Orthanc (the demo's PACS here) holds the scanner's images, as a scanner archives them,
    # and every derived object once, in the source study
    pacs = Orthanc(out / "pacs" / "orthanc").start()
    try:
        (study,) = pacs.studies()
        assert study["MainDicomTags"]["StudyInstanceUID"] == SimStudyInfo(seed=7).study_instance_uid
        assert len(pacs.instances()) == summary["derived"] + 48 * 4 * 2
        modalities = {s["MainDicomTags"].get("Modality") for s in pacs.series()}
        assert {"MR", "SEG", "SR"} <= modalities
    finally:
        pacs.stop()
    # The test command's environment is the one setup made: run a part of the suite in it.
    tests = subprocess.run(
        [str(clone / ".venv" / "bin" / "python"), "-m", "pytest", "-q", "tests/test_config.py"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=600,
    )
    assert tests.returncode == 0, tests.stdout[-3000:]
