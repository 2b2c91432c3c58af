"""The Orthanc test PACS receives from dcmtk storescu and reports what it stored."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from qsmnode.sim.scanner import preset, simulate
from qsmnode.sim.vendor_dicom import SimStudyInfo, write_dicom
from tests.conftest import require_tool
from tests.orthanc import Orthanc


@pytest.fixture
def orthanc(tmp_path: Path):
    require_tool("Orthanc", "orthanc")
    server = Orthanc(tmp_path / "orthanc").start()
    yield server
    server.stop()


def test_orthanc_stores_a_study_and_survives_a_restart(orthanc: Orthanc, tmp_path: Path) -> None:
    sim = simulate(preset("tiny", snr=0.0))
    files = write_dicom(sim.gre, tmp_path / "dicom", "enhanced", SimStudyInfo(seed=3))
    storescu = require_tool("storescu", "dcmtk")
    run = subprocess.run(
        [storescu, "-aec", orthanc.ae_title, "127.0.0.1", str(orthanc.dicom_port),
         *map(str, files)],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert len(orthanc.instances()) == len(files)
    (study,) = orthanc.studies()
    assert study["MainDicomTags"]["StudyInstanceUID"] == SimStudyInfo(seed=3).study_instance_uid
    orthanc.stop()
    orthanc.start()
    assert len(orthanc.instances()) == len(files)
