"""The prior query (qsmnode.node.prior_query) against Debian's Orthanc: one Orthanc for the
module holds small TID 1500 reports (highdicom, no pipeline run) of a few patients; the search
finds a patient's earlier qsmnode reports by C-FIND and retrieves them by C-GET or C-MOVE.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from qsmnode.demo.pacs import Orthanc, free_port
from qsmnode.node.association import Peer
from qsmnode.node.prior_query import (
    PriorQuery,
    PriorQueryError,
    PriorSearch,
    _is_qsmnode_report,
    find_prior_reports,
)
from tests.conftest import require_tool
from tests.deliveryutil import rejecting_peer, slow_requestor

CALLING = "QSMNODE"
MOVE_AE = "QSMPRIOR"

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


@dataclass(frozen=True)
class Patient:
    patient_id: str
    name: str
    issuer: str = ""


ADA = Patient("PRIORPID-417", "Priortest^Ada", "HOSP-A")
ADA_ELSEWHERE = Patient("PRIORPID-417", "Elsewhere^Abe", "HOSP-Z")  # same ID, other issuer
BOB = Patient("PRIORPID-999", "Otherpat^Bob")
DORA = Patient("PRIORPID-D", "Vendor^Dora")
EVE = Patient("PRIORPID-E", "Single^Eve")
NAMES = ("PRIORPID", "Priortest", "Ada", "Elsewhere", "Otherpat", "Vendor^Dora", "Dora",
         "Single^Eve")


def mr_source(patient: Patient, study_uid: str, date: str, time_: str) -> Dataset:
    """A tiny MR image header: the evidence of the report (its patient and study)."""
    mr = Dataset()
    mr.SOPClassUID = MR_IMAGE
    mr.SOPInstanceUID = generate_uid()
    mr.SeriesInstanceUID = generate_uid()
    mr.StudyInstanceUID = study_uid
    mr.PatientID = patient.patient_id
    mr.PatientName = patient.name
    mr.PatientBirthDate = "19700101"
    mr.PatientSex = "F"
    mr.StudyDate = date
    mr.StudyTime = time_
    mr.StudyID = "1"
    mr.AccessionNumber = "ACC1"
    mr.ReferringPhysicianName = ""
    mr.Modality = "MR"
    mr.SeriesNumber = 1
    mr.InstanceNumber = 1
    return mr


def report(patient: Patient, study_uid: str, date: str, time_: str, content: str,
           manufacturer: str = "qsmnode", template: str = "1500") -> Dataset:
    """A TID 1500 Comprehensive 3D SR of one measurement in the study, made at ``content``
    (YYYYMMDD HHMMSS)."""
    measurement = hd.sr.Measurement(
        name=hd.sr.CodedConcept("chi-mean", "99QSMTEST", "Mean susceptibility"),
        value=0.012, unit=hd.sr.CodedConcept("ppm", "UCUM", "ppm"))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="M1"),
        measurements=[measurement])
    content_item = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(),
        procedure_reported=hd.sr.CodedConcept("24590-2", "LN", "MR Brain"),
        imaging_measurements=[group])
    sr = hd.sr.Comprehensive3DSR(
        evidence=[mr_source(patient, study_uid, date, time_)], content=content_item,
        series_instance_uid=generate_uid(), series_number=90, sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer=manufacturer)
    sr.ContentDate, sr.ContentTime = content.split()
    if patient.issuer:
        sr.IssuerOfPatientID = patient.issuer
    sr.ContentTemplateSequence[0].TemplateIdentifier = template
    return sr


def upload(server: Orthanc, ds: Dataset) -> None:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    request = urllib.request.Request(f"{server.url}/instances", data=buffer.getvalue(),
                                     method="POST",
                                     headers={"Content-Type": "application/dicom"})
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    assert answer.get("Status") == "Success", answer


@dataclass
class Pacs:
    server: Orthanc
    move_port: int
    studies: dict[str, str]  # name -> StudyInstanceUID
    reports: dict[str, str]  # name -> SOPInstanceUID

    def peer(self, ae_title: str = "ORTHANC", port: int | None = None) -> Peer:
        return Peer("test-pacs", ae_title, "127.0.0.1",
                    self.server.dicom_port if port is None else port, CALLING)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pacs]:
    require_tool("Orthanc", "orthanc")
    move_port = free_port()
    server = Orthanc(tmp_path_factory.mktemp("prior") / "orthanc",
                     known_modalities={CALLING: ("127.0.0.1", move_port),
                                       MOVE_AE: ("127.0.0.1", move_port)})
    server.start()
    studies: dict[str, str] = {}
    reports: dict[str, str] = {}

    def add(name: str, patient: Patient, date: str, time_: str,
            *contents: tuple[str, str, str, str]) -> None:
        studies[name] = uid = generate_uid()
        for key, content, manufacturer, template in contents:
            sr = report(patient, uid, date, time_, content, manufacturer, template)
            reports[key] = sr.SOPInstanceUID
            upload(server, sr)

    q, tid = "qsmnode", "1500"
    try:
        add("ada_old", ADA, "20240110", "093000", ("ada_old", "20240110 120000", q, tid))
        add("ada_mid", ADA, "20250305", "080000", ("ada_mid_first", "20250305 100000", q, tid),
            ("ada_mid_second", "20250306 090000", q, tid))
        add("ada_current", ADA, "20250601", "101500", ("ada_current", "20250601 120000", q, tid))
        add("ada_same_day", ADA, "20250601", "070000", ("ada_same_day", "20250601 080000", q,
                                                        tid))
        add("ada_later", ADA, "20250701", "101500", ("ada_later", "20250701 120000", q, tid))
        add("ada_elsewhere", ADA_ELSEWHERE, "20230301", "101500",
            ("ada_elsewhere", "20230301 120000", q, tid))
        add("bob_old", BOB, "20230505", "101500", ("bob_old", "20230505 120000", q, tid))
        add("dora_old", DORA, "20240202", "101500",
            ("dora_vendor", "20240202 120000", "OtherVendor", tid),
            ("dora_template", "20240202 130000", q, "2000"))
        add("dora_current", DORA, "20250101", "101500", ("dora_current", "20250101 120000", q,
                                                         tid))
        add("eve_current", EVE, "20250101", "101500", ("eve_current", "20250101 120000", q,
                                                       tid))
        yield Pacs(server, move_port, studies, reports)
    finally:
        server.kill()


def ada_query(pacs: Pacs) -> PriorQuery:
    return PriorQuery(ADA.patient_id, ADA.issuer, pacs.studies["ada_current"], "20250601")


def uids(search: PriorSearch) -> list[str]:
    return [str(ds.SOPInstanceUID) for ds in search.reports]


def test_earlier_reports_newest_first(pacs: Pacs) -> None:
    search = find_prior_reports(pacs.peer(), ada_query(pacs), timeout_s=10)
    r = pacs.reports
    # not the current study's, nor the same day's or a later one's, nor another patient's
    # (other PatientID, or the same ID from another issuer)
    assert uids(search) == [r["ada_mid_second"], r["ada_mid_first"], r["ada_old"]]
    assert search.studies == 2
    assert [str(ds.StudyInstanceUID) for ds in search.reports] == [
        pacs.studies["ada_mid"], pacs.studies["ada_mid"], pacs.studies["ada_old"]]
    assert all(ds.PatientID == ADA.patient_id for ds in search.reports)
    assert all(ds.file_meta.TransferSyntaxUID for ds in search.reports)
    assert search.note == (f"2 earlier studies in {pacs.peer()}, 2 with a qsmnode report "
                           "(3 reports).")


def test_without_issuer_or_date(pacs: Pacs) -> None:
    """No issuer: the same ID from another issuer counts; no date: every other study does."""
    query = PriorQuery(ADA.patient_id, "", pacs.studies["ada_current"], "")
    search = find_prior_reports(pacs.peer(), query, timeout_s=10)
    r = pacs.reports
    assert uids(search) == [r["ada_later"], r["ada_same_day"], r["ada_mid_second"],
                            r["ada_mid_first"], r["ada_old"], r["ada_elsewhere"]]
    assert search.studies == 5


def test_max_studies_keeps_the_newest(pacs: Pacs) -> None:
    search = find_prior_reports(pacs.peer(), ada_query(pacs), timeout_s=10, max_studies=1)
    r = pacs.reports
    assert uids(search) == [r["ada_mid_second"], r["ada_mid_first"]]
    assert search.studies == 2
    assert "the newest 1 searched" in search.note


def test_other_patients_not_returned(pacs: Pacs) -> None:
    """Bob's study is his; Ada's ID from issuer HOSP-Z is another patient's."""
    bob = find_prior_reports(pacs.peer(), PriorQuery(BOB.patient_id, "", generate_uid(),
                                                     "20260101"), timeout_s=10)
    assert uids(bob) == [pacs.reports["bob_old"]]
    elsewhere = find_prior_reports(
        pacs.peer(), PriorQuery(ADA.patient_id, ADA_ELSEWHERE.issuer, generate_uid(),
                                "20240101"), timeout_s=10)
    assert uids(elsewhere) == [pacs.reports["ada_elsewhere"]]
    assert elsewhere.studies == 1
    returned = set(uids(find_prior_reports(pacs.peer(), ada_query(pacs), timeout_s=10)))
    assert not returned & {pacs.reports["bob_old"], pacs.reports["ada_elsewhere"]}


def test_which_reports_are_qsmnode_reports() -> None:
    """The check on the retrieved dataset (Orthanc names the Manufacturer at SERIES level, so
    another maker's series is passed over before it is retrieved)."""
    uid = generate_uid()
    ours = report(ADA, uid, "20240101", "101010", "20240101 120000")
    assert _is_qsmnode_report(ours)
    assert not _is_qsmnode_report(report(ADA, uid, "20240101", "101010", "20240101 120000",
                                         manufacturer="OtherVendor"))
    assert not _is_qsmnode_report(report(ADA, uid, "20240101", "101010", "20240101 120000",
                                         template="2000"))
    del ours.ContentTemplateSequence
    assert not _is_qsmnode_report(ours)


def test_other_reports_ignored(pacs: Pacs) -> None:
    """Another maker's SR and a qsmnode SR of another template: the study counts, no report."""
    query = PriorQuery(DORA.patient_id, "", pacs.studies["dora_current"], "20250101")
    search = find_prior_reports(pacs.peer(), query, timeout_s=10)
    assert search.reports == ()
    assert search.studies == 1
    assert search.note == f"1 earlier study in {pacs.peer()}, without a qsmnode report."


def test_no_prior(pacs: Pacs) -> None:
    query = PriorQuery(EVE.patient_id, "", pacs.studies["eve_current"], "20250101")
    search = find_prior_reports(pacs.peer(), query, timeout_s=10)
    assert search.reports == ()
    assert search.studies == 0
    assert search.note == f"No earlier study of the patient in {pacs.peer()}."
    unknown = find_prior_reports(pacs.peer(), PriorQuery("NOSUCHPID", "", generate_uid(), ""),
                                 timeout_s=10)
    assert (unknown.reports, unknown.studies) == ((), 0)


def test_move_returns_what_get_returns(pacs: Pacs) -> None:
    got = find_prior_reports(pacs.peer(), ada_query(pacs), timeout_s=10)
    moved = find_prior_reports(pacs.peer(), ada_query(pacs), timeout_s=10, retrieve="move",
                               move_ae_title=MOVE_AE, move_port=pacs.move_port)
    assert uids(moved) == uids(got) and len(uids(moved)) == 3
    assert (moved.studies, moved.note) == (got.studies, got.note)
    # the storage SCP is gone afterwards: nothing listens on the port (SO_REUSEADDR: the
    # sub-operations' connections may linger in TIME_WAIT)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", pacs.move_port))
        s.listen()


def test_move_to_a_destination_the_pacs_does_not_know(pacs: Pacs) -> None:
    with pytest.raises(PriorQueryError, match=r"prior query to test-pacs .*C-MOVE .*failed"):
        find_prior_reports(pacs.peer(), ada_query(pacs), timeout_s=10, retrieve="move",
                           move_ae_title="NOTKNOWN", move_port=free_port())


def test_bad_arguments(pacs: Pacs) -> None:
    with pytest.raises(ValueError, match="retrieve"):
        find_prior_reports(pacs.peer(), ada_query(pacs), retrieve="fetch")
    with pytest.raises(ValueError, match="move_ae_title"):
        find_prior_reports(pacs.peer(), ada_query(pacs), retrieve="move")
    with pytest.raises(ValueError, match="PatientID"):  # would match every patient
        find_prior_reports(pacs.peer(), PriorQuery("", "", generate_uid(), ""))
    with pytest.raises(ValueError, match="study_date"):
        find_prior_reports(pacs.peer(), PriorQuery("X", "", generate_uid(), "2025-01-01"))


def test_nothing_listening() -> None:
    port = free_port()
    peer = Peer("gone-pacs", "ORTHANC", "127.0.0.1", port, CALLING)
    started = time.monotonic()
    with pytest.raises(PriorQueryError) as caught:
        find_prior_reports(peer, PriorQuery("X1", "", generate_uid(), ""), timeout_s=3)
    assert time.monotonic() - started < 3 + 2
    assert str(caught.value).startswith(f"prior query to {peer}: cannot connect")


def test_stopped_orthanc(orthanc: Orthanc) -> None:
    orthanc.start()
    peer = Peer("stopped-pacs", orthanc.ae_title, "127.0.0.1", orthanc.dicom_port, CALLING)
    orthanc.kill()
    with pytest.raises(PriorQueryError, match=r"^prior query to stopped-pacs \(ORTHANC@"):
        find_prior_reports(peer, PriorQuery("X1", "", generate_uid(), ""), timeout_s=3)


def test_silent_peer_times_out() -> None:
    """A peer that accepts the connection and never answers: the error within ~timeout_s."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        peer = Peer("silent-pacs", "ORTHANC", "127.0.0.1", listener.getsockname()[1], CALLING)
        started = time.monotonic()
        with pytest.raises(PriorQueryError, match=r"^prior query to silent-pacs .*timed out"):
            find_prior_reports(peer, PriorQuery("X1", "", generate_uid(), ""), timeout_s=2)
        assert 1.5 < time.monotonic() - started < 2 + 3


def test_rejected(pacs: Pacs) -> None:
    with pytest.raises(PriorQueryError, match=r"prior query to test-pacs .*association "
                                              r"rejected: called AE title not recognised"):
        find_prior_reports(pacs.peer("NOTORTHANC"), ada_query(pacs), timeout_s=5)


def test_rejected_when_the_requestor_looks_after_the_close(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom's requesting thread, looking only after the rejection closed the connection,
    reads the association as aborted: the rejection is still what is reported."""
    slow_requestor(monkeypatch)
    with rejecting_peer("PACS") as port:
        peer = Peer("slow-pacs", "NOTPACS", "127.0.0.1", port, CALLING)
        with pytest.raises(PriorQueryError, match=r"^prior query to slow-pacs .*association "
                                                  r"rejected: called AE title not recognised"):
            find_prior_reports(peer, PriorQuery("X1", "", generate_uid(), ""), timeout_s=30)


def test_find_failure_status() -> None:
    """A C-FIND answered with a failure: the error gives the status, and the PACS's comment
    without the patient's ID."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    def on_find(event: object) -> Iterator[tuple[Dataset, None]]:
        status = Dataset()
        status.Status = 0xA700
        status.ErrorComment = "no room for PRIORPID-417"
        yield status, None

    ae = AE(ae_title="FAILPACS")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_FIND, on_find)])
    try:
        peer = Peer("failing-pacs", "FAILPACS", "127.0.0.1", server.server_address[1], CALLING)
        with pytest.raises(PriorQueryError) as caught:
            find_prior_reports(peer, PriorQuery(ADA.patient_id, "", generate_uid(), ""),
                               timeout_s=5)
    finally:
        server.shutdown()
    message = str(caught.value)
    assert message.startswith(f"prior query to {peer}: STUDY C-FIND failed: 0xA700")
    assert "no room for <PatientID>" in message
    assert ADA.patient_id not in message


def test_logs_carry_no_patient_data(pacs: Pacs, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    libraries = [logging.getLogger(name) for name in ("pynetdicom", "pydicom", "highdicom")]
    levels = [logger.level for logger in libraries]
    for logger in libraries:  # however the process set them
        logger.setLevel(logging.DEBUG)
    try:
        find_prior_reports(pacs.peer(), ada_query(pacs), timeout_s=10)
        find_prior_reports(pacs.peer(), ada_query(pacs), timeout_s=10, retrieve="move",
                           move_ae_title=MOVE_AE, move_port=pacs.move_port)
    finally:
        for logger, level in zip(libraries, levels, strict=True):
            logger.setLevel(level)
    assert any(r.name.startswith("pynetdicom") for r in caplog.records)  # the test can see it
    lines = [r for r in caplog.records if r.name == "qsmnode.node.prior_query"]
    assert len(lines) == 2 and all(r.levelno == logging.INFO for r in lines)
    assert pacs.studies["ada_current"] in lines[0].getMessage()
    assert "2 earlier studies" in lines[0].getMessage()
    for record in caplog.records:
        text = record.getMessage()
        for value in NAMES:
            assert value not in text, (record.name, text)


def test_pynetdicom_heard_again_after_a_search(pacs: Pacs,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """pynetdicom is kept quiet only while the search runs, and only in its thread."""
    caplog.set_level(logging.INFO)
    library = logging.getLogger("pynetdicom")
    level = library.level
    library.setLevel(logging.INFO)
    try:
        find_prior_reports(pacs.peer(), ada_query(pacs), timeout_s=10)
        logging.getLogger("pynetdicom.association").info("a line after the search")
    finally:
        library.setLevel(level)
    assert "a line after the search" in caplog.text
