"""The HL7 v2.5.1 ORU^R01 of one result, built with hl7apy, and the RIS's acknowledgement.

Layout (:func:`build_oru`; every value from outside is escaped by hl7apy's data types)::

    MSH|^~\\&|<sending app>|<sending facility>|<receiving app>|<receiving facility>|
        <result time>||ORU^R01^ORU_R01|<control ID>|P|2.5.1|||AL|NE||UNICODE UTF-8
    PID|||<Patient ID>^^^<issuer>&<universal ID>&<type>^MR||<family>^<given>^<middle>^
        <suffix>^<prefix>||<birth date>|<sex>
    ORC|RE|<placer order>|<filler order>
    OBR|1|<placer order>|<filler order>|QSM-M1^7T QSM motor cortex analysis^99QSM|||
        <study date/time>|...|<accession number> (OBR-18)|<requested procedure ID> (OBR-19)|
        <study UID> (OBR-20)|<result time> (OBR-22)||MR (OBR-24)|P (OBR-25)
    OBX|n|ST|STUDY-UID^Study Instance UID^99QSM||<study UID>||||||P
    OBX|n|ST|SR-UID^...  and  SEG-UID^...  and  KOS-UID^...  (when made)
    OBX|n|RP|VIEWER^Results in the viewer^99QSM||<URL>^<sending app>^TEXT^HTML  (configured)
    OBX|n|ST|NOTE^...||no accession number in the images: sent with an empty OBR-18
    OBX|n|<NM or ST>|<code>^<text>^99QSM|<sub-ID>|<value>|<UCUM>^<unit>^UCUM||<flag>|||<P or X>
        (the observations of :mod:`qsmnode.node.hl7_observations`)

The message control ID (MSH-10) is derived from the result's identity (:func:`control_id`),
so the same result always goes out under the same ID and a RIS can drop a repeat. The message
time is the result's, so a rebuilt message is the same message.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from qsmnode.node.hl7_observations import CODING_SYSTEM, Observation

HL7_VERSION = "2.5.1"
CONTROL_ID_PREFIX = "QSM"
CONTROL_ID_LENGTH = 20
"""MSH-10 is at most 20 characters in v2.5.1."""
SERVICE = ("QSM-M1", "7T QSM motor cortex analysis")
"""OBR-4, in the local coding system."""


class HL7MessageError(ValueError):
    """An ORU that cannot be built, or an answer that is not an HL7 acknowledgement."""


@dataclass(frozen=True)
class Patient:
    """The patient as the images name them (DICOM Patient module); empty strings where they
    have nothing."""

    patient_id: str = ""
    issuer: str = ""
    issuer_universal_id: str = ""
    issuer_universal_id_type: str = ""
    name: str = ""
    """DICOM PN: family^given^middle^prefix^suffix."""
    birth_date: str = ""
    sex: str = ""


@dataclass(frozen=True)
class ResultFacts:
    """Everything one ORU says: who, which exam, which objects, and the observations."""

    result_key: str
    """The result's identity: the same result gives the same key (and control ID)."""
    study_uid: str
    finished_at: float
    patient: Patient = field(default_factory=Patient)
    accession_number: str = ""
    requested_procedure_id: str = ""
    placer_order: str = ""
    filler_order: str = ""
    study_date: str = ""
    study_time: str = ""
    sr_uid: str = ""
    seg_uid: str = ""
    kos_uid: str = ""
    viewer_url: str = ""
    notes: tuple[str, ...] = ()
    observations: tuple[Observation, ...] = ()


@dataclass(frozen=True)
class Parties:
    """MSH-3 to MSH-6."""

    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str


def control_id(result_key: str) -> str:
    """The message control ID of a result: ``QSM`` and 17 characters of the SHA-256 of its
    key in base 32 (MSH-10 holds 20)."""
    digest = hashlib.sha256(result_key.encode()).digest()
    code = base64.b32encode(digest).decode().rstrip("=")
    return (CONTROL_ID_PREFIX + code)[:CONTROL_ID_LENGTH]


def hl7_time(at: float) -> str:
    """HL7 DTM in UTC: ``YYYYMMDDHHMMSS+0000``."""
    return datetime.fromtimestamp(at, UTC).strftime("%Y%m%d%H%M%S+0000")


def _dicom_datetime(date: str, time_: str) -> str:
    """DICOM DA and TM as an HL7 DTM (``YYYYMMDD[HHMM[SS]]``); "" when the date is not DA."""
    if not re.fullmatch(r"\d{8}", date):
        return ""
    clock = re.match(r"\d{2,6}", time_ or "")
    digits = clock.group(0) if clock else ""
    return date + digits[: len(digits) - len(digits) % 2]


_SEX = {"M": "M", "F": "F", "O": "O"}


def _text(value: str, kind: str = "ST") -> Any:
    """A text value as an hl7apy data type (it escapes the delimiters)."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.factories import datatype_factory

    return datatype_factory(kind, _clean(value), version=HL7_VERSION,
                            validation_level=VALIDATION_LEVEL.TOLERANT)


def _escaped(value: str) -> str:
    """A text as escaped ER7 (for the fields of type varies, OBX-5)."""
    return str(_text(value).to_er7())


def _clean(value: str) -> str:
    """No control characters (a segment ends at CR), no padding."""
    return re.sub(r"[\x00-\x1f\x7f]", " ", str(value)).strip()


def _set(element: Any, name: str, value: str, kind: str = "ST") -> None:
    if value:
        setattr(element, name, _text(value, kind))


def _msh(message: Any, facts: ResultFacts, parties: Parties) -> None:
    msh = message.msh
    msh.msh_3.hd_1 = _text(parties.sending_application, "IS")
    msh.msh_4.hd_1 = _text(parties.sending_facility, "IS")
    msh.msh_5.hd_1 = _text(parties.receiving_application, "IS")
    msh.msh_6.hd_1 = _text(parties.receiving_facility, "IS")
    msh.msh_7 = hl7_time(facts.finished_at)
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = control_id(facts.result_key)
    msh.msh_11 = "P"
    msh.msh_12 = HL7_VERSION
    msh.msh_15 = "AL"
    msh.msh_16 = "NE"
    msh.msh_18 = "UNICODE UTF-8"


def _pid(pid: Any, patient: Patient) -> None:
    pid.pid_1 = "1"
    cx = pid.pid_3
    cx.cx_1 = _text(patient.patient_id or "UNKNOWN")
    if patient.issuer or patient.issuer_universal_id:
        _set(cx.cx_4, "hd_1", patient.issuer, "IS")
        _set(cx.cx_4, "hd_2", patient.issuer_universal_id)
        _set(cx.cx_4, "hd_3", patient.issuer_universal_id_type, "ID")
    cx.cx_5 = "MR"
    parts = (patient.name.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = parts
    xpn = pid.pid_5
    _set(xpn.xpn_1, "fn_1", family)
    _set(xpn, "xpn_2", given)
    _set(xpn, "xpn_3", middle)
    _set(xpn, "xpn_4", suffix)
    _set(xpn, "xpn_5", prefix)
    if re.fullmatch(r"\d{8}", patient.birth_date):
        pid.pid_7 = patient.birth_date
    if patient.sex.strip().upper() in _SEX:
        pid.pid_8 = _SEX[patient.sex.strip().upper()]


def _order(order: Any, facts: ResultFacts) -> None:
    orc, obr = order.orc, order.obr
    orc.orc_1 = "RE"
    _set(orc.orc_2, "ei_1", facts.placer_order)
    _set(orc.orc_3, "ei_1", facts.filler_order)
    obr.obr_1 = "1"
    _set(obr.obr_2, "ei_1", facts.placer_order)
    _set(obr.obr_3, "ei_1", facts.filler_order)
    obr.obr_4 = f"{SERVICE[0]}^{_escaped(SERVICE[1])}^{CODING_SYSTEM}"
    when = _dicom_datetime(facts.study_date, facts.study_time)
    if when:
        obr.obr_7 = when
    _set(obr, "obr_18", facts.accession_number)
    _set(obr, "obr_19", facts.requested_procedure_id)
    _set(obr, "obr_20", facts.study_uid)
    obr.obr_22 = hl7_time(facts.finished_at)
    obr.obr_24 = "MR"
    obr.obr_25 = "P"


def reference_observations(facts: ResultFacts, sending_application: str
                           ) -> list[Observation]:
    """The OBX that point to the DICOM results: the study, the SR, SEG and KOS instance UIDs,
    a viewer link, and the notes (no accession number, ...)."""
    rows = [Observation("STUDY-UID", "Study Instance UID", "ST", facts.study_uid)]
    for code, text, uid in (("SR-UID", "Structured report SOP Instance UID", facts.sr_uid),
                            ("SEG-UID", "Segmentation SOP Instance UID", facts.seg_uid),
                            ("KOS-UID", "Key object selection SOP Instance UID",
                             facts.kos_uid)):
        if uid:
            rows.append(Observation(code, text, "ST", uid))
    if facts.viewer_url:
        rows.append(Observation("VIEWER", "Results in the viewer", "RP", facts.viewer_url))
    for index, note in enumerate(facts.notes, start=1):
        rows.append(Observation("NOTE", "Delivery note", "ST", note, f"NOTE.{index}"))
    return rows


def _obx(obx: Any, index: int, row: Observation, sending_application: str) -> None:
    obx.obx_1 = str(index)
    obx.obx_2 = row.value_type
    obx.obx_3 = f"{row.code}^{_escaped(row.text)}^{CODING_SYSTEM}"
    if row.sub_id:
        obx.obx_4 = _text(row.sub_id)
    if row.value_type == "RP":
        obx.obx_5 = f"{_escaped(row.value)}^{_escaped(sending_application)}^TEXT^HTML"
    elif row.value:
        obx.obx_5 = _escaped(row.value)
    if row.unit is not None:
        obx.obx_6 = f"{_escaped(row.unit[0])}^{_escaped(row.unit[1])}^UCUM"
    if row.flag:
        obx.obx_8 = row.flag
    obx.obx_11 = row.status


def build_oru(facts: ResultFacts, parties: Parties) -> str:
    """The ORU^R01 of a result as ER7 (segments ended by CR), validated by hl7apy against the
    v2.5.1 message structure.

    Raises:
        HL7MessageError: hl7apy refuses it (the message says why; it quotes no values).
    """
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.core import Message
    from hl7apy.exceptions import HL7apyException

    try:
        message = Message("ORU_R01", version=HL7_VERSION,
                          validation_level=VALIDATION_LEVEL.TOLERANT)
        _msh(message, facts, parties)
        result = message.add_group("ORU_R01_PATIENT_RESULT")
        _pid(result.add_group("ORU_R01_PATIENT").pid, facts.patient)
        order = result.add_group("ORU_R01_ORDER_OBSERVATION")
        _order(order, facts)
        rows = [*reference_observations(facts, parties.sending_application),
                *facts.observations]
        for index, row in enumerate(rows, start=1):
            _obx(order.add_group("ORU_R01_OBSERVATION").obx, index, row,
                 parties.sending_application)
        message.validate()
        return str(message.to_er7())
    except HL7apyException as exc:
        raise HL7MessageError(f"hl7apy refused the ORU: {type(exc).__name__}: "
                              f"{_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [""])[0][:200]


ACK_CODES = ("AA", "AE", "AR", "CA", "CE", "CR")
"""HL7 table 0008."""


@dataclass(frozen=True)
class Ack:
    """An acknowledgement: MSA-1 ``code``, MSA-2 the acknowledged ``control_id``, and the
    RIS's ``text`` (MSA-3 and the ERR segments' diagnostics)."""

    code: str
    control_id: str
    text: str = ""

    @property
    def accepted(self) -> bool:
        return self.code in ("AA", "CA")

    @property
    def rejected(self) -> bool:
        return self.code in ("AR", "CR")


def parse_ack(text: str) -> Ack:
    """Read an ACK with hl7apy.

    Raises:
        HL7MessageError: not an HL7 message, or one without an MSA segment with a known code.
    """
    from hl7apy.exceptions import HL7apyException
    from hl7apy.parser import parse_message

    er7 = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    if not er7.startswith("MSH"):
        raise HL7MessageError("the answer is not an HL7 message (it does not start with MSH)")
    try:
        message = parse_message(er7, find_groups=False)
    except (HL7apyException, ValueError, IndexError, KeyError) as exc:
        raise HL7MessageError(f"the answer is not a readable HL7 message ({type(exc).__name__}: "
                              f"{_first_line(exc)})") from None
    segments = {segment.name: segment for segment in message.children}
    msa = segments.get("MSA")
    if msa is None:
        raise HL7MessageError("the answer has no MSA segment: not an acknowledgement")
    code = str(msa.msa_1.to_er7()).strip()
    if code not in ACK_CODES:
        raise HL7MessageError(f"the acknowledgement code {code[:10]!r} is not one of "
                              f"{', '.join(ACK_CODES)}")
    words = [_unescape(str(msa.msa_3.to_er7()))] if msa.msa_3.to_er7() else []
    for segment in message.children:
        if segment.name == "ERR":
            words += [_unescape(str(segment.err_8.to_er7()))] if segment.err_8.to_er7() else []
            words += [_unescape(str(segment.err_7.to_er7()))] if segment.err_7.to_er7() else []
    return Ack(code, str(msa.msa_2.to_er7()).strip(), "; ".join(w for w in words if w))


_ESCAPES = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\"}


def _unescape(text: str) -> str:
    """ER7 escapes back to text, components joined by spaces."""
    text = text.replace("^", " ").replace("&", " ")
    return re.sub(r"\\([FSTRE])\\", lambda m: _ESCAPES[m.group(1)], text).strip()


def describe(observations: Sequence[Observation]) -> str:
    """The abnormal flags of a message's observations, for logs: ``H x2, HH x1``."""
    counts: dict[str, int] = {}
    for row in observations:
        if row.flag and row.flag != "N":
            counts[row.flag] = counts.get(row.flag, 0) + 1
    return ", ".join(f"{flag} x{n}" for flag, n in sorted(counts.items())) or "none"
