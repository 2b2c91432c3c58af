"""The facts of one done job for its ORU^R01: the patient and exam from the images, the derived
objects from the outbox, and the observations from the job's result.

The patient and request attributes come from the job's source images in the spool (the
scanner's headers: Patient ID and its issuer, name, birth date, sex, accession number,
requested procedure ID, order numbers); when those are gone, from its derived objects in the
outbox (same Patient and Study modules). The values go into the message only: never into a log
line, the store's status columns or the audit log.
"""

from __future__ import annotations

import logging
import string
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qsmnode.node.config import HL7Config
from qsmnode.node.hl7_message import Patient, ResultFacts
from qsmnode.node.hl7_observations import Thresholds, observations
from qsmnode.node.store import JobRecord, Store, series_key

log = logging.getLogger(__name__)

SR_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.88.22",
    "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34",
})
"""Basic, Enhanced, Comprehensive and Comprehensive 3D SR."""
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"

NO_ACCESSION = ("no accession number in the images: sent with an empty OBR-18; the RIS must "
                "match the exam by the Study Instance UID (OBR-20)")

_HEADER_KEYWORDS = (
    "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "PatientName",
    "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyInstanceUID", "StudyDate",
    "StudyTime", "RequestAttributesSequence", "RequestedProcedureID",
    "PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest",
)


class FactsError(RuntimeError):
    """The job's facts cannot be gathered (the message says why, without patient data)."""


def _read_header(paths: Iterable[Path]) -> Any:
    """The header of the first readable file (patient, study and request attributes)."""
    import pydicom
    from pydicom.datadict import tag_for_keyword

    tags = [t for k in _HEADER_KEYWORDS if (t := tag_for_keyword(k)) is not None]
    for path in paths:
        if not path.is_file():
            continue
        with warnings.catch_warnings():  # pydicom's warnings quote the values
            warnings.simplefilter("ignore")
            try:
                return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
            except Exception:  # a damaged file: try the next one
                continue
    return None


def _value(ds: Any, keyword: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            value = ds.get(keyword)
        except Exception:
            return ""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return str(value).strip()


def _request(ds: Any, keyword: str) -> str:
    """A request attribute, top level or in the first Request Attributes item."""
    direct = _value(ds, keyword)
    if direct:
        return direct
    items = ds.get("RequestAttributesSequence") or []
    return _value(items[0], keyword) if len(items) else ""


def patient_of(ds: Any) -> Patient:
    qualifiers = ds.get("IssuerOfPatientIDQualifiersSequence") or []
    first = qualifiers[0] if len(qualifiers) else None
    return Patient(
        patient_id=_value(ds, "PatientID"),
        issuer=_value(ds, "IssuerOfPatientID"),
        issuer_universal_id="" if first is None else _value(first, "UniversalEntityID"),
        issuer_universal_id_type=("" if first is None
                                  else _value(first, "UniversalEntityIDType")),
        name=_value(ds, "PatientName"),
        birth_date=_value(ds, "PatientBirthDate"),
        sex=_value(ds, "PatientSex"),
    )


def viewer_link(template: str | None, values: dict[str, str]) -> str:
    """The configured viewer URL with its placeholders filled ("" without a template)."""
    if not template:
        return ""
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    return template.format(**{name: values.get(name, "") for name in fields})


def result_key(store: Store, job: JobRecord) -> str:
    """The identity of a job's result: its acquisition's series and the software that made it
    (the same input and version give the same key, hence the same control ID)."""
    acquisition = store.acquisition(job.acquisition_id)
    series = series_key(acquisition.series_uids) if acquisition is not None else str(job.id)
    version = (job.result or {}).get("version", "")
    return f"{series}|{version}"


def job_facts(store: Store, job: JobRecord, state_dir: Path, hl7: HL7Config) -> ResultFacts:
    """The facts of a done job (see the module docstring).

    Raises:
        FactsError: neither its source images nor its derived objects can be read.
    """
    acquisition = store.acquisition(job.acquisition_id)
    if acquisition is None:
        raise FactsError(f"acquisition {job.acquisition_id} of job {job.id} is not in the store")
    derived = store.outbox(job_id=job.id)
    sources = [state_dir / record.path for record in store.job_instances(job.id)]
    ds = _read_header([*sources[:3], *(state_dir / record.path for record in derived[:3])])
    if ds is None:
        raise FactsError(f"job {job.id}: neither its source images nor its derived objects can "
                         "be read (removed by retention?)")
    uids = {"sr_uid": "", "seg_uid": "", "kos_uid": ""}
    for record in derived:
        key = ("sr_uid" if record.sop_class_uid in SR_CLASSES else "seg_uid"
               if record.sop_class_uid == SEG_CLASS else "kos_uid"
               if record.sop_class_uid == KOS_CLASS else None)
        if key is not None and not uids[key]:
            uids[key] = record.sop_instance_uid
    accession = _value(ds, "AccessionNumber")
    thresholds = Thresholds(hl7.z_high, hl7.z_critical)
    m1 = (job.result or {}).get("m1")
    notes = [] if accession else [NO_ACCESSION]
    link = viewer_link(hl7.viewer_url, {"study_uid": acquisition.study_uid,
                                        "accession_number": accession, **uids})
    return ResultFacts(
        result_key=result_key(store, job),
        study_uid=acquisition.study_uid,
        finished_at=job.finished_at or job.updated_at,
        patient=patient_of(ds),
        accession_number=accession,
        requested_procedure_id=_request(ds, "RequestedProcedureID"),
        placer_order=_request(ds, "PlacerOrderNumberImagingServiceRequest"),
        filler_order=_request(ds, "FillerOrderNumberImagingServiceRequest"),
        study_date=_value(ds, "StudyDate"),
        study_time=_value(ds, "StudyTime"),
        viewer_url=link,
        notes=tuple(notes),
        observations=tuple(observations(m1, thresholds)),
        **uids,
    )
