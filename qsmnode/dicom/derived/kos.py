"""The Key Object Selection (KOS) document of one acquisition: what a reading workstation
flags for the radiologist.

One KOS (highdicom, TID 2010) in the source study, its own series (100 × the source series
number + 8), titled "Of Interest" (DCM 113000), referencing the key images, the SR and the
SEG. Its description (Key Object Description, TID 2010) gives the reason: the M1 finding on the
deep-layer χ z-scores (:func:`kos_reason`), the same words as the ORU's finding, or why there
is none. UIDs are deterministic like every derived object's (role ``kos``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from qsmnode.dicom.derived.common import MANUFACTURER, BuildContext
from qsmnode.dicom.derived.key_images import Z_FLAG
from qsmnode.m1.followup import FollowUp
from qsmnode.m1.result import M1Result

KOS_ROLE = "kos"
KOS_SERIES_OFFSET = 8
"""Series number: 100 × the source series number + this (after the key images' 7)."""
Z_HIGH = Z_FLAG
"""A deep-layer χ z-score at or beyond this (either sign) is the finding, by default: the site
sets it with ``[pipeline] z_flag`` (passed as ``z_high``; the key images use the same value;
the ORU uses ``[hl7] z_high``, 2 by default)."""
DESCRIPTION_CHARS = 1000
"""The Key Object Description is a TEXT item; it is kept short."""

_AREA_NAMES = {"left_hand": "left hand area", "right_hand": "right hand area",
               "left_foot": "left foot area", "right_foot": "right foot area"}


_UNITS = {"chi_mean_ppm": ("chi", "ppm", 4), "thickness_mean_mm": ("thickness", "mm", 2),
          "t2star_signal_ratio": ("T2* ratio", "", 3)}


def _change_text(follow_up: FollowUp | None) -> str:
    """The changes since the prior beyond the test–retest limit, as a clause ("" if none)."""
    if follow_up is None or follow_up.prior is None or not follow_up.exceeding():
        return ""
    parts = []
    for c in follow_up.exceeding():
        name, unit, digits = _UNITS[c.measure]
        layer = "" if c.layer == "all" else f" {c.layer}"
        parts.append(f"{_AREA_NAMES.get(c.area, c.area)}{layer} {name} {c.change:+.{digits}f}"
                     f"{' ' + unit if unit else ''}")
    return (f"; changed beyond test-retest since {follow_up.prior.study_date}: "
            + "; ".join(parts))


def kos_reason(m1: M1Result | None, m1_note: str | None = None, z_high: float = Z_HIGH,
               follow_up: FollowUp | None = None, qsm_note: str | None = None) -> str:
    """Why the objects are flagged, in one line: the deep-layer χ finding, or why there is
    none, then the changes since the patient's prior report beyond the test–retest limit.
    With ``qsm_note`` (QSM was not computed) it says so and why, and what there is instead."""
    if qsm_note:
        what = ("R2* maps and the M1 T2* signal and thickness for review" if m1 is not None
                else f"R2* maps for review; no M1 analysis: {m1_note or 'not run'}")
        return f"{qsm_note}; {what}" + _change_text(follow_up)
    return _finding(m1, m1_note, z_high) + _change_text(follow_up)


def _finding(m1: M1Result | None, m1_note: str | None, z_high: float) -> str:
    if m1 is None:
        return f"QSM maps for review; no M1 analysis: {m1_note or 'not run'}"
    scored = [(m, m.chi_z) for m in m1.measurements
              if m.layer == "deep" and m.covered and m.chi_z is not None
              and math.isfinite(m.chi_z)]
    if not scored:
        return ("QSM and M1 results for review; no normative table: deep-layer susceptibility "
                "not graded")
    beyond = [(m, z) for m, z in scored if abs(z) >= z_high]
    if not beyond:
        return (f"QSM and M1 results for review; deep-layer susceptibility within z "
                f"+/-{z_high:g} in the {len(scored)} covered area"
                f"{'' if len(scored) == 1 else 's'}")
    parts = [f"{_AREA_NAMES.get(m.area, m.area)} {'raised' if z > 0 else 'lowered'} "
             f"(z {z:.1f})" for m, z in beyond]
    return "Deep-layer susceptibility beyond the norm: " + "; ".join(parts)


def build_key_object_selection(
    ctx: BuildContext,
    referenced: Sequence[Dataset],
    reason: str,
) -> hd.ko.KeyObjectSelectionDocument:
    """The KOS referencing ``referenced`` (key images, SR, SEG: datasets of the same study),
    with ``reason`` as its description."""
    if not referenced:
        raise ValueError("a key object selection needs at least one object to reference")
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest,
        referenced_objects=list(referenced),
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=ctx.uids.uid(f"{KOS_ROLE}/device"),
                name=ctx.software_versions[:64],
                manufacturer_name=MANUFACTURER,
            ),
        ),
        description=reason[:DESCRIPTION_CHARS],
    )
    numbers = [n for n in ctx.loaded.series_numbers if n is not None]
    series_number = (100 * min(numbers) if numbers else 9900) + KOS_SERIES_OFFSET
    document = hd.ko.KeyObjectSelectionDocument(
        evidence=list(referenced),
        content=content,
        series_instance_uid=ctx.uids.uid(f"{KOS_ROLE}/series"),
        series_number=series_number,
        sop_instance_uid=ctx.uids.uid(f"{KOS_ROLE}/instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    # the same Patient and Study modules as the other derived objects (highdicom copies
    # only part of them from the evidence)
    document.copy_patient_and_study_information(ctx.sources.echo1()[0])
    document.SeriesDescription = "QSM M1 key objects"
    document.SeriesDate = document.ContentDate = ctx.created.strftime("%Y%m%d")
    document.SeriesTime = document.ContentTime = ctx.created.strftime("%H%M%S")
    return document
