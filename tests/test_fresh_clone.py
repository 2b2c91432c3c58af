"""The README's commands work from a fresh clone with no virtual environment present."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from qsmnode.sim.vendor_dicom import SimStudyInfo
from tests.conftest import REPO, require_tool
from tests.orthanc import Orthanc

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1500)  # setup and two visits; the suite's other worker shares the cores
def test_make_demo_from_a_fresh_clone(tmp_path: Path) -> None:
    """``make demo`` from a fresh clone, in its follow-up form (two visits a year apart, the
    second compared with the first's report found in the PACS: issue 17's demo)."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout: nothing to clone")
    require_tool("Orthanc", "orthanc")
    require_tool("storescu", "dcmtk")
    clone = tmp_path / "qsmnode"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    assert not (clone / ".venv").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    report = tmp_path / "demo.json"
    demo = subprocess.run(
        ["make", "demo", f"DEMO_ARGS=--size small-slab --follow-up --report-json {report}"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    out = clone / "demo-output"
    for visit in (1, 2):
        assert len(list((out / f"scanner-visit-{visit}").rglob("*.dcm"))) == 48 * 4 * 2
    assert "left_hand   deep" in demo.stdout and "right_foot  all" in demo.stdout
    assert "total: last image received → last object acknowledged" in demo.stdout
    assert sorted(p.name for p in (out / "key-images").iterdir()) == [
        "key-image-1.png", "key-image-2.png"]
    summary = json.loads(report.read_text())
    assert summary["result"]["m1"]["measurements"] and "error" not in summary["result"]["m1"]

    # the follow-up: only the left hand area's deep layer changed between the visits (+0.01
    # then +0.03 ppm in the simulator's truth, qsmnode.demo.run.FOLLOW_UP_VISITS)
    first, second = summary["visits"]
    assert first["m1"]["follow_up"]["prior"] is None  # nothing before the first visit
    follow = second["m1"]["follow_up"]
    assert [p["study_date"] for p in follow["history"]] == ["2025-06-05"]
    assert follow["prior"]["study_uid"] == first["acquisition"]["study_uid"]
    deep = {c["area"]: c for c in follow["changes"]
            if c["layer"] == "deep" and c["measure"] == "chi_mean_ppm"}
    assert set(deep) == {"left_hand", "right_hand", "left_foot", "right_foot"}
    assert deep["left_hand"]["change"] > 0.005 and deep["left_hand"]["exceeds"], deep
    for area in ("right_hand", "left_foot", "right_foot"):
        assert abs(deep[area]["change"]) < 0.005 and not deep[area]["exceeds"], deep[area]
    assert "Follow-up: compared with the result of 2025-06-05" in demo.stdout
    # the second visit's report, as delivered, references the first visit's report
    outbox = out / "node" / "state" / "outbox"
    reports = {}
    for path in outbox.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.Modality == "SR":
            reports[str(ds.StudyInstanceUID)] = ds
    sr1 = reports[first["acquisition"]["study_uid"]]
    sr2 = reports[second["acquisition"]["study_uid"]]
    assert follow["prior"]["report_uid"] == sr1.SOPInstanceUID
    other = sr2.PertinentOtherEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert other.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sr1.SOPInstanceUID

    # Orthanc (the demo's PACS here) holds the scanner's images, as a scanner archives them,
    # and every derived object once, in the source study of each visit
    pacs = Orthanc(out / "pacs" / "orthanc").start()
    try:
        studies = {s["MainDicomTags"]["StudyInstanceUID"] for s in pacs.studies()}
        assert studies == {SimStudyInfo(seed=6).study_instance_uid,
                           SimStudyInfo(seed=7).study_instance_uid}
        assert len(pacs.instances()) == summary["derived"] + 2 * 48 * 4 * 2
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
