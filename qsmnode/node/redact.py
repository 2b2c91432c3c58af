"""Keeping dataset values out of error text: names, IDs, dates, free text of the patient and
study modules.

Exceptions from libraries quote the values they choke on (highdicom: ``Unable to convert
'1970-01-01' to 'DA' object``). A job's error text and log lines go to the node's log, the audit
log, the store and the status page, so the worker child redacts every value of these attributes
that its acquisition's files hold (:func:`dataset_values`, :class:`Redactor`), whatever the
form of the value (valid or not): each becomes ``<Keyword>``.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterable, Iterator

PATIENT_AND_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientNames",
    "PatientBirthDate", "PatientBirthName", "PatientMotherBirthName", "PatientAge",
    "PatientAddress", "PatientTelephoneNumbers", "PatientComments", "EthnicGroup",
    "MilitaryRank", "BranchOfService", "MedicalRecordLocator",
    "AccessionNumber", "StudyID", "StudyDescription", "StudyDate",
    "ReferringPhysicianName", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy",
    "OperatorsName", "RequestingPhysician", "AdmittingDiagnosesDescription",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
    "RequestedProcedureDescription", "PerformedProcedureStepDescription", "ImageComments",
)
"""Attributes whose values never appear in error text (the patient and study modules, and
free text that may name a person). Sizes, weights and times are left out: short numbers that
would blank ordinary numbers in a message."""

PERSON_NAME_KEYWORDS = frozenset({
    "PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
    "ReferringPhysicianName", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy",
    "OperatorsName", "RequestingPhysician",
})
"""Person names: their components (family, given names) are redacted one by one too. Other
values (descriptions, institution names) only whole: their words ("Brain", "QSM") are the
words of ordinary messages."""

_MIN_LENGTH = 3  # shorter fragments (a sex, "1", a PN suffix) would blank ordinary words
_SPLIT = re.compile(r"[\^=\\ ]+")


def _forms(value: str, words: bool) -> set[str]:
    """The forms a value can take in an error: as stored, stripped, with PN carets as spaces,
    escaped as ``repr`` writes it, each of its lines, and (``words``, person names) its
    components."""
    text = value.strip(" \x00")
    forms = {text, value, text.replace("^", " ").strip()}
    forms.add(text.encode("unicode_escape").decode("ascii"))  # as repr() quotes it
    forms.update(line.strip() for line in text.splitlines())
    if words:
        forms.update(_SPLIT.split(text))
    return {f for f in forms if len(f) >= _MIN_LENGTH}


@contextlib.contextmanager
def _quiet_reading() -> Iterator[None]:
    """pydicom reads without validating what it reads: its validation warns *and* logs (to
    the ``pydicom`` logger, which no warnings filter silences) with the value quoted."""
    import pydicom.config

    settings = pydicom.config.settings
    mode = settings.reading_validation_mode
    settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        settings.reading_validation_mode = mode


def dataset_values(paths: Iterable[str]) -> dict[str, str]:
    """The values of :data:`PATIENT_AND_STUDY_KEYWORDS` in the files at ``paths`` (each form,
    to the keyword it came from). Unreadable files are skipped."""
    import pydicom
    from pydicom.datadict import tag_for_keyword

    tags = [t for k in PATIENT_AND_STUDY_KEYWORDS if (t := tag_for_keyword(k)) is not None]
    found: dict[str, str] = {}
    seen: set[bytes] = set()
    for path in paths:
        with _quiet_reading():  # pydicom's warnings and log records quote the invalid values
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
            except Exception:  # a damaged file: its job reports that (without its values)
                continue
            elements = []
            for tag in list(ds.keys()):
                try:
                    elements.append((ds[tag].keyword, ds[tag].value))
                except Exception:  # a value pydicom cannot convert: as stored
                    raw_element = ds.get_item(tag)
                    elements.append((pydicom.datadict.keyword_for_tag(tag), raw_element.value))
        for keyword, raw in elements:
            if raw is None or raw in ("", b""):
                continue
            if isinstance(raw, bytes):
                key = raw
            else:
                key = repr(raw).encode(errors="replace")
            if key in seen or keyword not in PATIENT_AND_STUDY_KEYWORDS:
                continue
            seen.add(key)
            texts = [str(v) for v in raw] if isinstance(
                raw, (list, tuple, pydicom.multival.MultiValue)) else [
                raw.decode("latin-1") if isinstance(raw, bytes) else str(raw)]
            for text in texts:
                for form in _forms(text, keyword in PERSON_NAME_KEYWORDS):
                    found.setdefault(form, keyword)
    return found


class Redactor:
    """Replaces each known value in a text by ``<Keyword>`` (longest values first), where it
    stands alone: not inside a longer word or number ("QSM" stays in "QSMNODE")."""

    def __init__(self, values: dict[str, str] | None = None) -> None:
        self.values = dict(values or {})
        ordered = sorted(self.values, key=len, reverse=True)
        alternatives = "|".join(map(re.escape, ordered))
        self._pattern = (re.compile(rf"(?<![0-9A-Za-z])(?:{alternatives})(?![0-9A-Za-z])")
                         if ordered else None)

    def __call__(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(lambda m: f"<{self.values[m.group(0)]}>", text)


NO_REDACTION = Redactor()
