"""The SR content of the acquisition protocol and of a follow-up comparison (issue 17).

Both are TID 1501 measurement groups of the report (:mod:`qsmnode.dicom.derived.sr`):

- **Acquisition protocol**: magnetic field strength (DCM 130542, T), the voxel size along i, j
  and k (mm), the slice thickness (mm, where the source records it: less than the voxel size
  along k with slice gaps, as in a 2-D protocol) and every echo time (ms): what a later study
  needs to know whether it can be compared with this one
  (:func:`qsmnode.m1.followup.why_not_comparable`). Its tracking identifier is the
  quality-control group's (OHIF merges groups by tracking UID and stops at a tracking UID
  without an outline).
- **Change since prior report**, one group per area and layer compared, with that region's
  tracking identifier and UID (the same finding tracked over time): per measure the prior
  value, the change, the change per year and the test–retest limit (NUM), whether the change
  is beyond it (a qualitative evaluation, SCT Yes/No), the time since the prior (years), and
  the prior report itself (COMPOSITE, DCM 122075 "Prior report for current patient").

The private codes (scheme ``99QSMNODE``) are listed here, so that
:mod:`qsmnode.dicom.prior_report` reads back exactly what is written.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.sr.coding import Code

from qsmnode.dicom.derived import codes
from qsmnode.dicom.derived.common import BuildContext
from qsmnode.dicom.headers import slice_thickness_mm
from qsmnode.m1.followup import MEASURES, Change, FollowUp

PRIVATE_SCHEME = codes.PRIVATE_SCHEME

PROTOCOL = Code("PROTOCOL", PRIVATE_SCHEME, "Acquisition protocol")
VOXEL_SIZE = tuple(Code(f"VOXEL-{axis.upper()}", PRIVATE_SCHEME, f"Voxel size along {axis}")
                   for axis in "ijk")

SLICE_THICKNESS = Code("SLICE-THICKNESS", PRIVATE_SCHEME, "Slice thickness")


def echo_time_code(n: int) -> Code:
    """The concept of echo ``n`` (1-based)'s echo time."""
    return Code(f"TE-{n}", PRIVATE_SCHEME, f"Echo time {n}")


CHANGE_SINCE_PRIOR = Code("CHANGE", PRIVATE_SCHEME, "Change since prior report")
INTERVAL = Code("INTERVAL", PRIVATE_SCHEME, "Time since prior report")

_MEASURE = {
    # measure: (code prefix, text, unit, unit per year)
    "chi_mean_ppm": ("CHI", "mean susceptibility", codes.PPM, Code("ppm/a", "UCUM", "ppm/year")),
    "thickness_mean_mm": ("THK", "mean cortical thickness", codes.MILLIMETER,
                          Code("mm/a", "UCUM", "mm/year")),
    "t2star_signal_ratio": ("T2S", "T2* signal ratio", codes.RATIO, Code("/a", "UCUM", "/year")),
}
ROLES = ("PRIOR", "CHANGE", "PER-YEAR", "LIMIT")
"""What each NUM of a change group is: the prior value, the change, per year, the limit."""


def change_code(measure: str, role: str) -> Code:
    """The concept of one NUM of a change group (``role`` one of :data:`ROLES`)."""
    prefix, text, _, _ = _MEASURE[measure]
    meaning = {"PRIOR": f"Prior {text}", "CHANGE": f"Change in {text}",
               "PER-YEAR": f"Change in {text} per year",
               "LIMIT": f"Test-retest limit of {text}"}[role]
    return Code(f"{prefix}-{role}", PRIVATE_SCHEME, meaning)


def beyond_code(measure: str) -> Code:
    """The concept of "the change of ``measure`` is beyond its test–retest limit"."""
    prefix, text, _, _ = _MEASURE[measure]
    return Code(f"{prefix}-BEYOND", PRIVATE_SCHEME, f"Change in {text} beyond test-retest")


def _num(name: Code, value: float, unit: Code) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=float(value), unit=unit)


def protocol_group(ctx: BuildContext, tracking: hd.sr.TrackingIdentifier,
                   algorithm: hd.sr.AlgorithmIdentification) -> hd.sr.Template:
    """The acquisition protocol of this result (field strength, voxel size, echo times)."""
    gre = ctx.loaded.gre
    items = [_num(codes.MAGNETIC_FIELD_STRENGTH, gre.field_strength_t, codes.TESLA)]
    items += [_num(code, size, codes.MILLIMETER)
              for code, size in zip(VOXEL_SIZE, gre.voxel_size_mm, strict=True)]
    thickness = slice_thickness_mm(ctx.loaded.header)
    if thickness is not None:
        items.append(_num(SLICE_THICKNESS, thickness, codes.MILLIMETER))
    items += [_num(echo_time_code(n), te * 1e3, codes.MILLISECOND)
              for n, te in enumerate(gre.echo_times_s, start=1)]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, finding_type=PROTOCOL, algorithm_id=algorithm,
        measurements=items)


def change_groups(follow_up: FollowUp, tracking: dict[tuple[str, str], hd.sr.TrackingIdentifier],
                  sites: dict[str, hd.sr.FindingSite],
                  algorithm: hd.sr.AlgorithmIdentification) -> list[hd.sr.Template]:
    """One "change since prior report" group per compared area and layer (none without a
    comparable prior). ``tracking`` gives each region's tracking identifier, ``sites`` each
    area's finding site."""
    prior = follow_up.prior
    if prior is None or not follow_up.changes:
        return []
    by_region: dict[tuple[str, str], list[Change]] = {}
    for change in follow_up.changes:
        by_region.setdefault((change.area, change.layer), []).append(change)
    groups: list[hd.sr.Template] = []
    for (area, layer), changes in by_region.items():
        if (area, layer) not in tracking:
            continue
        measurements = []
        evaluations = []
        if follow_up.years is not None:
            measurements.append(_num(INTERVAL, follow_up.years, codes.YEAR))
        for c in sorted(changes, key=lambda c: MEASURES.index(c.measure)):
            _, _, unit, per_year = _MEASURE[c.measure]
            measurements += [_num(change_code(c.measure, "PRIOR"), c.prior, unit),
                             _num(change_code(c.measure, "CHANGE"), c.change, unit),
                             _num(change_code(c.measure, "LIMIT"), c.limit, unit)]
            if c.per_year is not None:
                measurements.append(_num(change_code(c.measure, "PER-YEAR"), c.per_year,
                                         per_year))
            evaluations.append(hd.sr.QualitativeEvaluation(
                beyond_code(c.measure), codes.YES if c.exceeds else codes.NO))
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking[(area, layer)], finding_type=CHANGE_SINCE_PRIOR,
            finding_category=codes.ANATOMICAL_STRUCTURE, finding_sites=[sites[area]],
            algorithm_id=algorithm, measurements=measurements,
            qualitative_evaluations=evaluations)
        group[0].ContentSequence.append(hd.sr.CompositeContentItem(
            name=codes.PRIOR_REPORT, referenced_sop_class_uid=prior.report_class_uid,
            referenced_sop_instance_uid=prior.report_uid,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
        groups.append(group)
    return groups
