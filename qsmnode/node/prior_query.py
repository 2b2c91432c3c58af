"""Finding a patient's earlier qsmnode Structured Reports in a PACS (DICOM Query/Retrieve SCU).

:func:`find_prior_reports` makes one association with the PACS (like
:func:`qsmnode.node.association.send_over_association`: the peer's calling AE title, its TLS, the
same timeouts and the same account of a refused or failed connection) and asks, in the Study Root
Query/Retrieve Information Model:

1. C-FIND, STUDY level: the studies of ``PatientID`` (exact: a returned PatientID that differs,
   e.g. because the ID held a wildcard character, is dropped) dated before the current study
   (``StudyDate`` range ``-YYYYMMDD`` of the day before, checked again on the answers). The
   current study is never a prior; a study whose IssuerOfPatientID is given and differs from
   the current one's is another patient's. The newest ``max_studies`` are searched.
2. C-FIND, SERIES level: the SR series of each study (a series whose Manufacturer is given and
   is not qsmnode is passed over), then IMAGE level: their Comprehensive 3D SR instances.
3. C-GET of those instances (the storage context proposed with the SCP role, the datasets kept
   in memory), or C-MOVE to a temporary storage SCP of this process (``retrieve="move"``: AE
   title ``move_ae_title`` listening on ``move_port`` of every interface, ``0.0.0.0``, since
   the PACS connects to the address it has on file for that AE title, rarely loopback; it
   accepts only associations called ``move_ae_title``, only Comprehensive 3D SR, and keeps
   only the instances asked for). A retrieve that fails, or ends without the instance, raises:
   the PACS holds a report that could not be read, which is not "no prior".
4. Only qsmnode reports are kept: Manufacturer ``qsmnode``, TID 1500, the patient asked for.

A PACS that cannot be asked, or that answers a request with a failure, raises
:class:`PriorQueryError` naming the peer and what failed; a PACS without an earlier study gives
an empty :class:`PriorSearch` with a note saying so. One INFO line per search gives the
counts, the peer and the study UID, never the PatientID or a name: pynetdicom, which logs
every C-FIND identifier at INFO, is kept below WARNING in the searching thread while it runs.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pydicom

from qsmnode import compat
from qsmnode.dicom.derived.common import MANUFACTURER
from qsmnode.node.association import (
    Peer,
    _uid_name,
    client_ssl_context,
    describe_rejection,
)
from qsmnode.node.logtext import printable
from qsmnode.node.redact import Redactor

log = logging.getLogger(__name__)

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
"""Comprehensive 3D SR Storage: the SOP class of qsmnode's reports."""
TEMPLATE_ID = "1500"
"""TID 1500 Measurement Report: the template of qsmnode's reports."""
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
MOVE_BIND_ADDRESS = "0.0.0.0"
"""Where the temporary storage SCP of ``retrieve="move"`` listens (every interface: the PACS
connects to the address it has configured for the move destination)."""

_PENDING = frozenset({0xFF00, 0xFF01})
_NOT_AUTHORISED = 0x0124


class PriorQueryError(RuntimeError):
    """The PACS could not be asked or did not answer; the message names the peer (str(peer))
    and what failed, never patient data."""


@dataclass(frozen=True)
class PriorQuery:
    patient_id: str
    issuer_of_patient_id: str
    """"" when the current study has none."""
    study_uid: str
    """The current study: never returned as a prior."""
    study_date: str
    """The current StudyDate (DA, YYYYMMDD); priors have a StudyDate strictly before it
    ("": any other study)."""


@dataclass(frozen=True)
class PriorSearch:
    reports: tuple[pydicom.Dataset, ...]
    """The qsmnode SRs retrieved, newest study first (StudyDate, StudyTime), within a study
    newest ContentDate/ContentTime first."""
    studies: int
    """Earlier studies of this patient the C-FIND found (with or without a qsmnode SR)."""
    note: str
    """One plain sentence of what was found, without patient data."""


@dataclass(frozen=True)
class _Study:
    uid: str
    date: str
    time: str


# ------------------------------------------------------------------------------------------------
# pynetdicom's logging of identifiers

_quiet_lock = threading.Lock()
_quiet_threads: dict[int, int] = {}


class _QuietThreads(logging.Filter):
    """Drops pynetdicom's records below WARNING from the threads running a search: it logs
    every C-FIND/C-GET/C-MOVE identifier (the PatientID) at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.thread not in _quiet_threads


_QUIET = _QuietThreads()


@contextmanager
def _quiet_pynetdicom() -> Iterator[None]:
    import pynetdicom  # noqa: F401  (its loggers exist once it is imported)

    loggers = [logging.getLogger("pynetdicom")] + [
        logger for name, logger in logging.Logger.manager.loggerDict.items()
        if name.startswith("pynetdicom.") and isinstance(logger, logging.Logger)]
    for logger in loggers:
        logger.addFilter(_QUIET)  # once: addFilter keeps one copy
    me = threading.get_ident()
    with _quiet_lock:
        _quiet_threads[me] = _quiet_threads.get(me, 0) + 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_threads[me] -= 1
            if not _quiet_threads[me]:
                del _quiet_threads[me]


# ------------------------------------------------------------------------------------------------
# Helpers


def _day_before(study_date: str) -> str:
    day = datetime.datetime.strptime(study_date, "%Y%m%d").date()
    return (day - datetime.timedelta(days=1)).strftime("%Y%m%d")


def _check(query: PriorQuery, retrieve: str, move_ae_title: str | None,
           move_port: int | None, max_studies: int) -> None:
    if retrieve not in ("get", "move"):
        raise ValueError(f"retrieve must be 'get' or 'move', not {retrieve!r}")
    if retrieve == "move":
        if not move_ae_title or not 0 < len(move_ae_title.strip()) <= 16:
            raise ValueError("retrieve='move' needs move_ae_title (1 to 16 characters)")
        if move_port is None or not 0 < move_port < 65536:
            raise ValueError("retrieve='move' needs move_port (1 to 65535)")
    if max_studies < 1:
        raise ValueError(f"max_studies must be at least 1, not {max_studies}")
    # an empty ID would match every patient; "\" would make it a list
    if not query.patient_id.strip() or "\\" in query.patient_id:
        raise ValueError("the query needs one non-empty PatientID")
    if query.study_date:
        try:
            _day_before(query.study_date)
        except ValueError:
            raise ValueError("study_date must be a DICOM date (YYYYMMDD) or empty") from None


def _text(ds: pydicom.Dataset | None, keyword: str) -> str:
    if ds is None:
        return ""
    value = ds.get(keyword, "")
    if isinstance(value, pydicom.multival.MultiValue):
        value = "\\".join(str(v) for v in value)
    return str(value if value is not None else "").strip(" \x00")


def _time_key(value: str) -> str:
    """A DICOM TM that sorts as text: HHMMSS padded with zeros, then the fraction."""
    whole, _, fraction = value.replace(":", "").partition(".")
    return f"{whole.ljust(6, '0')}.{fraction.ljust(6, '0')}"


def _is_qsmnode_report(ds: pydicom.Dataset) -> bool:
    try:
        template = str(ds.ContentTemplateSequence[0].TemplateIdentifier).strip()
    except (AttributeError, IndexError, KeyError, TypeError):
        return False
    return (_text(ds, "SOPClassUID") == COMPREHENSIVE_3D_SR
            and _text(ds, "Manufacturer") == MANUFACTURER and template == TEMPLATE_ID)


# ------------------------------------------------------------------------------------------------
# The search


class _Session:
    """One association with the PACS and the requests of a search."""

    def __init__(self, peer: Peer, query: PriorQuery, timeout_s: float, retrieve: str,
                 move_ae_title: str | None) -> None:
        self.peer = peer
        self.query = query
        self.timeout_s = timeout_s
        self.retrieve = retrieve
        self.move_ae_title = move_ae_title
        self.received: dict[str, pydicom.Dataset] = {}
        self.wanted: set[str] = set()
        self._lock = threading.Lock()
        # PACS error comments may quote the query: its patient values are blanked
        values = {query.patient_id: "PatientID"}
        if query.issuer_of_patient_id:
            values[query.issuer_of_patient_id] = "IssuerOfPatientID"
        self._redact = Redactor(values)
        self.assoc: Any = None

    def fail(self, what: str) -> PriorQueryError:
        return PriorQueryError(f"prior query to {self.peer}: {what}")

    # -- association

    def open(self) -> None:
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE, evt
        from pynetdicom.presentation import build_context, build_role

        peer = self.peer
        ae = AE(ae_title=peer.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s
        contexts = [build_context(STUDY_ROOT_FIND)]
        roles = []
        if self.retrieve == "get":
            contexts.append(build_context(STUDY_ROOT_GET))
            contexts.append(build_context(COMPREHENSIVE_3D_SR,
                                          [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
            roles.append(build_role(COMPREHENSIVE_3D_SR, scp_role=True))
        else:
            contexts.append(build_context(STUDY_ROOT_MOVE))
        ssl_context = client_ssl_context(peer.tls)
        tls_args = None if ssl_context is None else (ssl_context, peer.host)
        connected = threading.Event()
        rejected = compat.RejectionSeen()
        handlers = [(evt.EVT_CONN_OPEN, lambda event: connected.set()),
                    (evt.EVT_PDU_RECV, rejected.handler),
                    (evt.EVT_C_STORE, self.on_store)]
        with compat.capture_connect_errors() as errors:
            assoc = ae.associate(peer.host, peer.port, contexts=contexts,
                                 ae_title=peer.ae_title, ext_neg=roles or None,
                                 tls_args=tls_args, evt_handlers=handlers)
        if not assoc.is_established:
            rejection = rejected.rejection(assoc)
            if rejection is not None:
                raise self.fail(f"association rejected: {describe_rejection(rejection)}")
            if not connected.is_set():
                why = errors.messages[-1] if errors.messages else "no connection"
                raise self.fail(f"cannot connect: {printable(why)}")
            raise self.fail("association aborted or timed out during negotiation")
        self.assoc = assoc

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()
        self.assoc = None

    def require(self, sop_class: str) -> None:
        if not any(cx.abstract_syntax == sop_class for cx in self.assoc.accepted_contexts):
            raise self.fail(f"the PACS accepted no presentation context for "
                            f"{_uid_name(sop_class)}")

    # -- storage (C-GET sub-operations on the association, C-MOVE ones on the SCP)

    def on_store(self, event: Any) -> int:
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            uid = str(ds.SOPInstanceUID)
        except Exception:  # undecodable: the retrieve reports the failed sub-operation
            return 0xC000
        with self._lock:
            if uid not in self.wanted:
                return _NOT_AUTHORISED
            self.received[uid] = ds
        return 0x0000

    # -- requests

    def status_text(self, status: pydicom.Dataset, table: dict[int, tuple[str, str]]) -> str:
        from pynetdicom.status import code_to_category

        code = int(status.Status)
        category, meaning = table.get(code, (code_to_category(code), "unknown status"))
        text = f"0x{code:04X} ({category}: {meaning})" if meaning else f"0x{code:04X}"
        comment = _text(status, "ErrorComment")
        if comment:
            text += f": {printable(self._redact(comment))[:64]}"
        return text

    def find(self, identifier: pydicom.Dataset, level: str) -> list[pydicom.Dataset]:
        from pynetdicom.status import QR_FIND_SERVICE_CLASS_STATUS

        self.require(STUDY_ROOT_FIND)
        answers = []
        try:
            responses = self.assoc.send_c_find(identifier, STUDY_ROOT_FIND)
            for status, found in responses:
                if not status or "Status" not in status:
                    raise self.fail(f"no answer to the {level} C-FIND (the association was "
                                    "aborted or timed out)")
                code = int(status.Status)
                if code in _PENDING:
                    if found is not None:
                        answers.append(found)
                    continue
                if code != 0x0000:
                    raise self.fail(f"{level} C-FIND failed: "
                                    f"{self.status_text(status, QR_FIND_SERVICE_CLASS_STATUS)}")
        except RuntimeError as exc:
            if isinstance(exc, PriorQueryError):
                raise
            raise self.fail(f"{level} C-FIND: the association was lost") from None
        return answers

    def studies(self) -> list[_Study]:
        query = self.query
        identifier = pydicom.Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.PatientID = query.patient_id
        identifier.StudyDate = f"-{_day_before(query.study_date)}" if query.study_date else ""
        for keyword in ("StudyInstanceUID", "StudyTime", "IssuerOfPatientID",
                        "ModalitiesInStudy"):
            setattr(identifier, keyword, "")
        found: dict[str, _Study] = {}
        for answer in self.find(identifier, "STUDY"):
            uid = _text(answer, "StudyInstanceUID")
            date = _text(answer, "StudyDate")
            issuer = _text(answer, "IssuerOfPatientID")
            if not uid or uid == query.study_uid:
                continue
            if "PatientID" in answer and _text(answer, "PatientID") != query.patient_id:
                continue  # a wildcard character in the ID matched another patient
            if query.issuer_of_patient_id and issuer and issuer != query.issuer_of_patient_id:
                continue  # the same ID from another issuer: another patient
            if query.study_date and not (date and date < query.study_date):
                continue
            found[uid] = _Study(uid, date, _text(answer, "StudyTime"))
        return sorted(found.values(), key=lambda s: (s.date, _time_key(s.time), s.uid),
                      reverse=True)

    def sr_instances(self, study: _Study) -> list[tuple[str, str]]:
        """(series UID, SOP instance UID) of the study's Comprehensive 3D SR that may be
        qsmnode's."""
        identifier = pydicom.Dataset()
        identifier.QueryRetrieveLevel = "SERIES"
        identifier.StudyInstanceUID = study.uid
        identifier.Modality = "SR"
        identifier.SeriesInstanceUID = ""
        identifier.SeriesDescription = ""
        identifier.Manufacturer = ""
        series = []
        for answer in self.find(identifier, "SERIES"):
            uid = _text(answer, "SeriesInstanceUID")
            manufacturer = _text(answer, "Manufacturer")
            modality = _text(answer, "Modality")
            if uid and (not manufacturer or manufacturer == MANUFACTURER) and modality in (
                    "", "SR"):
                series.append(uid)
        instances = []
        for series_uid in sorted(set(series)):
            identifier = pydicom.Dataset()
            identifier.QueryRetrieveLevel = "IMAGE"
            identifier.StudyInstanceUID = study.uid
            identifier.SeriesInstanceUID = series_uid
            identifier.SOPClassUID = COMPREHENSIVE_3D_SR
            identifier.SOPInstanceUID = ""
            for answer in self.find(identifier, "IMAGE"):
                uid = _text(answer, "SOPInstanceUID")
                if uid and _text(answer, "SOPClassUID") in ("", COMPREHENSIVE_3D_SR):
                    instances.append((series_uid, uid))
        return instances

    def fetch(self, study: _Study, series_uid: str, sop_uid: str) -> None:
        """C-GET or C-MOVE one instance; its dataset lands in :attr:`received`."""
        from pynetdicom.status import QR_GET_SERVICE_CLASS_STATUS, QR_MOVE_SERVICE_CLASS_STATUS

        identifier = pydicom.Dataset()
        identifier.QueryRetrieveLevel = "IMAGE"
        identifier.StudyInstanceUID = study.uid
        identifier.SeriesInstanceUID = series_uid
        identifier.SOPInstanceUID = sop_uid
        with self._lock:
            self.wanted.add(sop_uid)
        if self.retrieve == "get":
            self.require(STUDY_ROOT_GET)
            self.require(COMPREHENSIVE_3D_SR)
            what, table = "C-GET", QR_GET_SERVICE_CLASS_STATUS
            responses = self.assoc.send_c_get(identifier, STUDY_ROOT_GET)
        else:
            self.require(STUDY_ROOT_MOVE)
            what, table = "C-MOVE", QR_MOVE_SERVICE_CLASS_STATUS
            responses = self.assoc.send_c_move(identifier, self.move_ae_title,
                                               STUDY_ROOT_MOVE)
        try:
            for status, _ in responses:
                if not status or "Status" not in status:
                    raise self.fail(f"no answer to the {what} of SR instance {sop_uid} (the "
                                    "association was aborted or timed out)")
                code = int(status.Status)
                if code in _PENDING:
                    continue
                if code != 0x0000 and not 0xB000 <= code <= 0xBFFF:
                    raise self.fail(f"{what} of SR instance {sop_uid} failed: "
                                    f"{self.status_text(status, table)}")
        except RuntimeError as exc:
            if isinstance(exc, PriorQueryError):
                raise
            raise self.fail(f"{what}: the association was lost") from None
        with self._lock:
            arrived = sop_uid in self.received
        if not arrived:
            raise self.fail(f"{what} of SR instance {sop_uid} ended without the instance")


@contextmanager
def _storage_scp(session: _Session, ae_title: str, port: int,
                 timeout_s: float) -> Iterator[None]:
    """A storage SCP for the C-MOVE sub-operations while the block runs."""
    from pynetdicom import AE, evt

    ae = AE(ae_title=ae_title)
    ae.require_called_aet = True
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_supported_context(COMPREHENSIVE_3D_SR)
    try:
        server = ae.start_server((MOVE_BIND_ADDRESS, port), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, session.on_store)])
    except OSError as exc:
        raise session.fail(f"cannot listen on port {port} for the C-MOVE: "
                           f"{exc.strerror or exc}") from None
    try:
        yield
    finally:
        server.shutdown()


def _note(peer: Peer, found: int, searched: int, with_report: int, reports: int) -> str:
    if not found:
        return f"No earlier study of the patient in {peer}."
    studies = "1 earlier study" if found == 1 else f"{found} earlier studies"
    if with_report == 0:
        reported = "none with a qsmnode report" if found > 1 else "without a qsmnode report"
    else:
        reported = f"{with_report} with a qsmnode report"
        if reports > with_report:
            reported += f" ({reports} reports)"
    limit = f" (the newest {searched} searched)" if searched < found else ""
    return f"{studies} in {peer}{limit}, {reported}."


def find_prior_reports(peer: Peer, query: PriorQuery, *, timeout_s: float = 30.0,
                       retrieve: str = "get", move_ae_title: str | None = None,
                       move_port: int | None = None, max_studies: int = 10) -> PriorSearch:
    """The qsmnode Structured Reports of the patient's earlier studies in ``peer`` (see the
    module docstring).

    Raises:
        ValueError: a bad ``retrieve`` (``get`` or ``move``), ``move`` without
            ``move_ae_title`` and ``move_port``, an empty PatientID, a malformed study date.
        PriorQueryError: the PACS refused or dropped the association, could not be reached
            or did not answer within ``timeout_s``, or answered a request with a failure.
    """
    _check(query, retrieve, move_ae_title, move_port, max_studies)
    started = time.monotonic()
    session = _Session(peer, query, timeout_s, retrieve, move_ae_title)
    with _quiet_pynetdicom():
        session.open()
        try:
            studies = session.studies()
            searched = studies[:max_studies]
            instances = [(study, series, sop) for study in searched
                         for series, sop in session.sr_instances(study)]
            if instances:
                scp = (_storage_scp(session, move_ae_title or "", move_port or 0, timeout_s)
                       if retrieve == "move" else contextlib.nullcontext())
                with scp:
                    for study, series, sop in instances:
                        session.fetch(study, series, sop)
        finally:
            session.close()

    order = {study.uid: index for index, study in enumerate(searched)}
    reports = []
    for ds in session.received.values():
        study_uid = _text(ds, "StudyInstanceUID")
        issuer = _text(ds, "IssuerOfPatientID")
        if (study_uid in order and _is_qsmnode_report(ds)
                and _text(ds, "PatientID") == query.patient_id
                and not (query.issuer_of_patient_id and issuer
                         and issuer != query.issuer_of_patient_id)):
            reports.append(ds)
    reports.sort(key=lambda ds: (_text(ds, "ContentDate"), _time_key(_text(ds, "ContentTime")),
                                 _text(ds, "SOPInstanceUID")), reverse=True)
    reports.sort(key=lambda ds: order[_text(ds, "StudyInstanceUID")])  # stable
    with_report = len({_text(ds, "StudyInstanceUID") for ds in reports})
    note = _note(peer, len(studies), len(searched), with_report, len(reports))
    log.info("prior query: %s: study %s: %d earlier stud%s, %d searched, %d SR instance%s "
             "retrieved (%s), %d qsmnode report%s, in %.2f s", peer,
             printable(query.study_uid), len(studies), "y" if len(studies) == 1 else "ies",
             len(searched), len(session.received), "" if len(session.received) == 1 else "s",
             f"C-{retrieve.upper()}", len(reports), "" if len(reports) == 1 else "s",
             time.monotonic() - started)
    return PriorSearch(tuple(reports), len(studies), note)


__all__ = ["PriorQuery", "PriorQueryError", "PriorSearch", "find_prior_reports"]
