"""Helpers for the HL7 tests: the test RIS as a subprocess (:mod:`tests.hl7_ris`), what it
received parsed with python-hl7, store rows for a done job, and a job function that returns an
M1 record with z-scores from the simulation's truth.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import hl7
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from qsmnode.demo.pacs import free_port
from qsmnode.node.store import InstanceRecord, NewAcquisition, StudyInfo
from tests.conftest import REPO
from tests.nodeutil import wait_for

RIS_SCRIPT = REPO / "tests" / "hl7_ris.py"

PATIENT_NAME = "Zyxwvut^Quintessa^Maribel"
PATIENT_ID = "PID-4711|X"
ACCESSION = "ACC20260042"


class RisProcess:
    """The test RIS (python-hl7's MLLP server) in a subprocess on a fixed port, so that it
    can be killed and started again at the same address."""

    def __init__(self, root: Path, answers: str = "aa", reason: str = "",
                 port: int | None = None, tls: tuple[Path, Path] | None = None) -> None:
        self.log = root / "ris.jsonl"
        self.answers = answers
        self.reason = reason
        self.port = port or free_port()
        self.tls = tls
        self.process: subprocess.Popen[str] | None = None

    def start(self, answers: str | None = None) -> RisProcess:
        if answers is not None:
            self.answers = answers
        command = [sys.executable, str(RIS_SCRIPT), "--log", str(self.log), "--port",
                   str(self.port), "--answers", self.answers, "--reason", self.reason]
        if self.tls is not None:
            command += ["--tls", str(self.tls[0]), str(self.tls[1])]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.startswith("listening"), f"the test RIS did not start: {line!r}"
        return self

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def received(self) -> list[dict[str, Any]]:
        """What arrived, in order: control ID, the answer given and the message text."""
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def wait_received(self, n: int, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        return wait_for(lambda: (lambda r: r if len(r) >= n else None)(self.received()),
                        f"{n} messages at the test RIS", timeout_s, 0.05)


def parsed(entry: dict[str, Any]) -> hl7.Message:
    return hl7.parse(entry["message"])


def component(field: Any, index: int) -> str:
    """Component ``index`` (1-based) of a python-hl7 field ("" when absent)."""
    repetition = field if isinstance(field, str) else field(1)
    if isinstance(repetition, str):
        return repetition if index == 1 else ""
    try:
        return str(repetition(index))
    except IndexError:
        return ""


def obx_rows(message: hl7.Message) -> list[dict[str, str]]:
    """Each OBX as code, sub-ID, value (unescaped), unit code, flag and status."""
    rows = []
    for segment in message.segments("OBX"):
        rows.append({
            "type": str(segment(2)), "code": component(segment(3), 1),
            "text": message.unescape(component(segment(3), 2)),
            "sub_id": str(segment(4)), "value": message.unescape(component(segment(5), 1)),
            "unit": component(segment(6), 1),
            "flag": str(segment(8)), "status": str(segment(11)),
        })
    return rows


# ------------------------------------------------------------------------------------------------
# A done job in a store, without running the pipeline


def source_file(path: Path, study_uid: str, series_uid: str, accession: str = ACCESSION
                ) -> pydicom.Dataset:
    """A small MR image header with the Patient and Study modules the ORU needs."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.IssuerOfPatientID = "HOSP"
    ds.PatientBirthDate = "19610203"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyDate = "20260105"
    ds.StudyTime = "093000"
    if accession:
        ds.AccessionNumber = accession
    ds.Modality = "MR"
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return ds


def done_job(store: Any, state_dir: Path, result: dict[str, Any], accession: str = ACCESSION,
             at: float | None = None) -> int:
    """Record a received image, its acquisition and a done job with ``result``; return the
    job ID."""
    now = time.time() if at is None else at
    study_uid, series_uid = generate_uid(), generate_uid()
    path = state_dir / "spool" / study_uid / series_uid / "1.dcm"
    ds = source_file(path, study_uid, series_uid, accession)
    store.add_instance(InstanceRecord(
        ds.SOPInstanceUID, ds.SOPClassUID, study_uid, series_uid, str(ExplicitVRLittleEndian),
        path.relative_to(state_dir).as_posix(), path.stat().st_size, "SCANNER7T",
        "127.0.0.1:1", now, modality="MR"))
    store.mark_series_complete(series_uid, now)
    outcome = store.record_grouping(
        study_uid, 1, [NewAcquisition(study_uid, (series_uid,), {"series_numbers": [1]})], [],
        now, study=StudyInfo(study_uid, accession))
    assert outcome is not None and outcome.jobs
    job = store.claim_job("test-owner", 60.0, now)
    assert job is not None
    assert store.finish_job(job.id, "test-owner", result, now)
    return job.id


# ------------------------------------------------------------------------------------------------
# M1 records


Z_DEEP_LEFT_HAND = 3.5
"""The z-score the test norm gives the left hand area's deep layer (others: 0.5)."""


def m1_record_from_truth(z_left_hand_deep: float = Z_DEEP_LEFT_HAND) -> dict[str, Any]:
    """The M1 record (as :func:`qsmnode.pipeline` writes it) of the small simulation's truth,
    with z-scores from a norm made for the test: the left hand area's deep layer lies
    ``z_left_hand_deep`` SDs above its norm, every other region 0.5 SD."""
    from tests.derivedutil import m1_from_truth
    from tests.nodeutil import small_simulation

    m1 = m1_from_truth(small_simulation())
    measurements = []
    for m in m1.measurements:
        if m.covered and math.isfinite(m.chi_mean_ppm):
            target = z_left_hand_deep if (m.area, m.layer) == ("left_hand", "deep") else 0.5
            sd = 0.01
            mean = m.chi_mean_ppm - target * sd
            m = dataclasses.replace(m, chi_z=(m.chi_mean_ppm - mean) / sd)
        measurements.append(dataclasses.asdict(m))
    return {"measurements": measurements, "flags": [dataclasses.asdict(f) for f in m1.flags]}


def m1_job(spec: Any) -> dict[str, Any]:
    """A node job function: the derived objects of the simulation's truth
    (:func:`tests.deliveryutil.truth_job`), and its M1 record with z-scores."""
    from tests.deliveryutil import truth_job

    result = truth_job(spec)
    return {**result, "version": "hl7-test", "m1": m1_record_from_truth()}


def wait_state(read: Any, what: str, timeout_s: float = 30.0) -> Any:
    return wait_for(read, what, timeout_s, 0.05)
