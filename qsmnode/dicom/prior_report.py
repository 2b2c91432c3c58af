"""Read an earlier qsmnode report (TID 1500 SR) back into numbers for a follow-up.

:func:`read_prior_report` turns the SR a previous run of qsmnode stored in PACS into a
:class:`~qsmnode.m1.followup.PriorResult`: the study, the report's UIDs, the algorithm version
(its Algorithm Identification), the acquisition protocol (the "Acquisition protocol" group of
:mod:`qsmnode.dicom.derived.followup`; None in reports made before it existed, and its slice
thickness None in reports made before that was recorded) and, per area
and layer (by the groups' Tracking Identifier), χ mean, thickness and T2*-weighted signal ratio.
It reads the content tree with pydicom, by concept codes, the same ones the writer uses.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from qsmnode.dicom.derived import codes
from qsmnode.dicom.derived.followup import PROTOCOL, SLICE_THICKNESS, VOXEL_SIZE, echo_time_code
from qsmnode.dicom.derived.segmentation import AREA_TEXT
from qsmnode.m1.followup import PriorResult, Protocol
from qsmnode.m1.result import LAYERS

TRACKING_IDENTIFIER = Code("112039", "DCM", "Tracking Identifier")
FINDING = Code("121071", "DCM", "Finding")
DERIVATION = Code("121401", "DCM", "Derivation")
ALGORITHM_VERSION = Code("111003", "DCM", "Algorithm Version")
MEASUREMENT_GROUP = Code("125007", "DCM", "Measurement Group")

_MEASURES = {
    (codes.MAGNETIC_SUSCEPTIBILITY, codes.MEAN): "chi_mean_ppm",
    (codes.THICKNESS, codes.MEAN): "thickness_mean_mm",
    (codes.T2STAR_WEIGHTED_SIGNAL, codes.MEAN): "t2star_signal_ratio",
}


class PriorReportError(ValueError):
    """The dataset is not a qsmnode report this version can read; the message says why."""


def _code(item: Dataset, attribute: str = "ConceptNameCodeSequence") -> tuple[str, str] | None:
    seq = item.get(attribute)
    if not seq:
        return None
    return (str(seq[0].get("CodeValue", "")), str(seq[0].get("CodingSchemeDesignator", "")))


def _is(item: Dataset, code: Code, attribute: str = "ConceptNameCodeSequence") -> bool:
    return _code(item, attribute) == (code.value, code.scheme_designator)


def _children(item: Dataset) -> list[Dataset]:
    return list(item.get("ContentSequence") or [])


def _walk(item: Dataset) -> Iterator[Dataset]:
    for child in _children(item):
        yield child
        yield from _walk(child)


def _number(item: Dataset) -> float | None:
    values = item.get("MeasuredValueSequence")
    if not values:
        return None
    return float(values[0].NumericValue)


def _region_names() -> dict[str, tuple[str, str]]:
    names = {}
    for area, text in AREA_TEXT.items():
        for layer in LAYERS:
            names[f"M1 {text} {layer}"] = (area, layer)
        names[f"M1 {text} all layers"] = (area, "all")
    return names


_REGIONS = _region_names()


def _date(text: str) -> dt.date:
    try:
        return dt.datetime.strptime(text.strip(), "%Y%m%d").date()
    except ValueError:
        raise PriorReportError(f"its StudyDate {text!r} is not a DICOM date") from None


def _protocol(group: Dataset) -> Protocol | None:
    values = {_code(c): _number(c) for c in _children(group) if c.get("ValueType") == "NUM"}
    field = values.get((codes.MAGNETIC_FIELD_STRENGTH.value,
                        codes.MAGNETIC_FIELD_STRENGTH.scheme_designator))
    voxels = [values.get((c.value, c.scheme_designator)) for c in VOXEL_SIZE]
    tes = []
    n = 1
    while (key := (echo_time_code(n).value, echo_time_code(n).scheme_designator)) in values:
        tes.append(values[key])
        n += 1
    if field is None or any(v is None for v in voxels) or not tes:
        return None
    thickness = values.get((SLICE_THICKNESS.value, SLICE_THICKNESS.scheme_designator))
    return Protocol(float(field), tuple(float(v) for v in voxels),  # type: ignore[arg-type]
                    tuple(float(t) / 1e3 for t in tes if t is not None),
                    None if thickness is None else float(thickness))


def read_prior_report(ds: Dataset) -> PriorResult:
    """The numbers of an earlier qsmnode SR.

    Raises:
        PriorReportError: it is not a TID 1500 report, or holds no M1 measurement.
    """
    templates = ds.get("ContentTemplateSequence") or []
    if not templates or str(templates[0].get("TemplateIdentifier", "")) != "1500":
        raise PriorReportError("it is not a TID 1500 measurement report")
    version = ""
    protocol: Protocol | None = None
    values: dict[tuple[str, str, str], float] = {}
    for container in _walk(ds):
        if container.get("ValueType") != "CONTAINER" or not _is(container, MEASUREMENT_GROUP):
            continue
        children = _children(container)
        finding = next((c for c in children if _is(c, FINDING)), None)
        for c in children:
            if _is(c, ALGORITHM_VERSION) and not version:
                version = str(c.get("TextValue", ""))
        if finding is not None and _is(finding, PROTOCOL, "ConceptCodeSequence"):
            protocol = _protocol(container)
            continue
        if finding is None or not _is(finding, codes.CEREBRAL_CORTEX, "ConceptCodeSequence"):
            continue  # quality control, outlines, changes since an earlier report
        tracking = next((str(c.get("TextValue", "")) for c in children
                         if _is(c, TRACKING_IDENTIFIER)), "")
        region = _REGIONS.get(tracking)
        if region is None:
            continue
        for num in children:
            if num.get("ValueType") != "NUM":
                continue
            derivation = next((m for m in _children(num) if _is(m, DERIVATION)), None)
            if derivation is None:
                continue
            name = _code(num)
            how = _code(derivation, "ConceptCodeSequence")
            for (concept, method), measure in _MEASURES.items():
                if name == (concept.value, concept.scheme_designator) and how == (
                        method.value, method.scheme_designator):
                    value = _number(num)
                    if value is not None:
                        values[(*region, measure)] = value
    if not values:
        raise PriorReportError("it holds no M1 measurement")
    return PriorResult(
        study_uid=str(ds.StudyInstanceUID),
        study_date=_date(str(ds.get("StudyDate", ""))),
        report_uid=str(ds.SOPInstanceUID),
        report_series_uid=str(ds.SeriesInstanceUID),
        report_class_uid=str(ds.SOPClassUID),
        algorithm_version=version,
        protocol=protocol,
        values=values,
    )
