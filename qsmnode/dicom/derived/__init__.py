"""The derived DICOM objects of one processed acquisition (DESIGN.md, "Derived objects").

:func:`build_derived` turns the arrays of the numerical core into datasets that stay in the
source study (same Patient, Study and Frame of Reference), reference their sources (echo 1 as
the source, the other echoes as further sources; the Parametric Maps and the SEG reference a
single-volume derived MR series first, which a viewer shows them on) and carry deterministic
UIDs:

====================  =====================================================  ============
object                what                                                   series no.
====================  =====================================================  ============
QSM Parametric Map    float32 ppm, Real World Value Mapping ``ppm``           100·s + 1
QSM derived MR        int16, 1 unit = 1 ppb, one image per slice              100·s + 2
R2* Parametric Map    float32 s⁻¹, Real World Value Mapping ``/s``            100·s + 3
R2* derived MR        int16, 1 unit = 0.1 s⁻¹, one image per slice            100·s + 4
Segmentation          BINARY, one segment per M1 area × depth bin present     100·s + 5
Comprehensive 3D SR   TID 1500 measurements per region and layer, QC          100·s + 6
Secondary Capture     RGB key images: QSM + outlines + table (hand, foot)     100·s + 7
Key Object Selection  "Of Interest": key images, SR, SEG; the finding (kos)   100·s + 8
====================  =====================================================  ============

(``s`` is the lowest source series number.) Each builder is usable on its own with a
:class:`BuildContext`.

When QSM was not computed (``qsm_note``: e.g. a 2-D protocol whose slices have gaps) there are
no QSM objects: the SEG and the SR's region outlines reference the R2* derived MR images, the SR
leaves the χ items out (they are NaN) and carries the failed ``qsm_computed`` flag of the M1
result, the key images show R2* with the reason, and the Key Object Selection's reason starts
with it.

Building calls highdicom's IOD look-up thousands of times: the start-up's
:func:`qsmnode.compat.install` memoises it (about half the build time); importing this package
changes nothing in highdicom.
"""

from __future__ import annotations

import datetime as dt
import warnings
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from qsmnode.dicom.derived.common import (
    ALGORITHM_NAME,
    BuildContext,
    ReadSource,
    SourceImages,
    source_reader,
)
from qsmnode.dicom.derived.derived_mr import QSM_MR, R2STAR_MR, build_derived_mr
from qsmnode.dicom.derived.key_images import Z_FLAG, build_key_images
from qsmnode.dicom.derived.kos import build_key_object_selection, kos_reason
from qsmnode.dicom.derived.parametric_map import QSM, R2STAR, build_parametric_map
from qsmnode.dicom.derived.segmentation import build_segmentation
from qsmnode.dicom.derived.sr import build_report
from qsmnode.dicom.derived.uids import DerivedUids
from qsmnode.dicom.load import LoadedAcquisition
from qsmnode.m1.followup import FollowUp
from qsmnode.m1.result import M1Result

__all__ = [
    "ALGORITHM_NAME",
    "BuildContext",
    "DerivedObjects",
    "DerivedUids",
    "ReadSource",
    "SourceImages",
    "build_derived",
    "build_derived_objects",
    "source_reader",
]


@dataclass
class DerivedObjects:
    """Every derived object of one acquisition, by kind."""

    qsm_map: hd.pm.ParametricMap | None
    """None when QSM was not computed."""
    qsm_images: list[Dataset]
    r2star_map: hd.pm.ParametricMap | None = None
    r2star_images: list[Dataset] = field(default_factory=list)
    segmentation: hd.seg.Segmentation | None = None
    report: hd.sr.Comprehensive3DSR | None = None
    key_images: list[Dataset] = field(default_factory=list)
    key_objects: hd.ko.KeyObjectSelectionDocument | None = None

    @property
    def datasets(self) -> list[Dataset]:
        """All of them, maps first, then images, SEG, SR and key images."""
        out: list[Dataset] = [*([self.qsm_map] if self.qsm_map is not None else []),
                              *self.qsm_images]
        if self.r2star_map is not None:
            out += [self.r2star_map, *self.r2star_images]
        if self.segmentation is not None:
            out.append(self.segmentation)
        if self.report is not None:
            out.append(self.report)
        out += list(self.key_images)
        return out if self.key_objects is None else [*out, self.key_objects]


def build_derived_objects(
    loaded: LoadedAcquisition,
    chi_ppm: NDArray[np.floating],
    r2star_per_s: NDArray[np.floating] | None,
    m1: M1Result | None,
    read_source: ReadSource,
    algorithm_version: str,
    created: dt.datetime | None = None,
    m1_note: str | None = None,
    z_flag: float = Z_FLAG,
    follow_up: FollowUp | None = None,
    qsm_note: str | None = None,
) -> DerivedObjects:
    """Build every derived object of one acquisition.

    Args:
        loaded: the acquisition (its sources, UIDs, geometry and patient/study data).
        chi_ppm: χ in ppm on the acquisition grid ``[i, j, k]`` (NaN outside the mask is
            stored as 0).
        r2star_per_s: R2* in s⁻¹ on the same grid, or None to skip the R2* objects.
        m1: the M1 analysis, or None (no SEG and no SR; the key image says so).
        read_source: SOP Instance UID → dataset of a source image (header suffices), e.g.
            :func:`source_reader` over the source files.
        algorithm_version: goes into every UID, the algorithm identification and the
            software versions: a new version gives new UIDs.
        created: series/content date and time (default: now).
        m1_note: without ``m1``, why there is no M1 analysis (shown on the key images).
        z_flag: a deep-layer χ z-score at or beyond it (either sign) is flagged on the key
            images and is the finding of the Key Object Selection (``[pipeline] z_flag``).
        follow_up: the comparison of ``m1`` with the patient's earlier results (the SR's
            change groups and the key images' trend panel); None: no follow-up.
        qsm_note: why QSM was not computed (``chi_ppm`` is then unused and ``r2star_per_s``
            required): no QSM objects, R2* in their place (see the module).
    """
    if qsm_note and r2star_per_s is None:
        raise ValueError("without QSM the derived objects are built on R2*: give r2star_per_s")
    with warnings.catch_warnings():
        # highdicom warns of a one-part patient name by quoting it: PHI must not reach the log
        warnings.filterwarnings("ignore", message=PERSON_NAME_WARNING, category=UserWarning)
        ctx = BuildContext.create(loaded, read_source, algorithm_version, created)
        if qsm_note:
            out = DerivedObjects(qsm_map=None, qsm_images=[])
        else:
            qsm_images = list(build_derived_mr(ctx, chi_ppm, QSM_MR))
            out = DerivedObjects(
                qsm_map=build_parametric_map(ctx, chi_ppm, QSM, reference=qsm_images),
                qsm_images=qsm_images,
            )
        if r2star_per_s is not None:
            out.r2star_images = list(build_derived_mr(ctx, r2star_per_s, R2STAR_MR))
            out.r2star_map = build_parametric_map(
                ctx, r2star_per_s, R2STAR, reference=out.r2star_images
            )
        shown_on = out.qsm_images or out.r2star_images  # the images regions are drawn on
        # the finding, in the same words in the SR and the KOS
        finding = kos_reason(m1, m1_note, z_flag, follow_up, qsm_note)
        if m1 is not None:
            out.segmentation = build_segmentation(ctx, m1, reference=shown_on)
            maps = [m for m in (out.qsm_map, out.r2star_map) if m is not None]
            out.report = build_report(
                ctx, m1, out.segmentation, evidence=maps, regions_on=shown_on,
                follow_up=follow_up, finding=finding,
            )
        out.key_images = list(build_key_images(ctx, chi_ppm, m1, m1_note, z_flag, follow_up,
                                               qsm_note=qsm_note, r2star_per_s=r2star_per_s))
        flagged = [*out.key_images, *(o for o in (out.report, out.segmentation) if o)]
        out.key_objects = build_key_object_selection(ctx, flagged, finding)
    return out


PERSON_NAME_WARNING = r"The string .* is unlikely to represent the intended person name"
"""highdicom's warning about a patient name of one component, which quotes the name."""


def build_derived(
    loaded: LoadedAcquisition,
    chi_ppm: NDArray[np.floating],
    r2star_per_s: NDArray[np.floating] | None,
    m1: M1Result | None,
    read_source: ReadSource,
    algorithm_version: str,
    created: dt.datetime | None = None,
    m1_note: str | None = None,
    z_flag: float = Z_FLAG,
    follow_up: FollowUp | None = None,
    qsm_note: str | None = None,
) -> list[Dataset]:
    """Every derived object as a list of datasets (see :func:`build_derived_objects`)."""
    return build_derived_objects(
        loaded, chi_ppm, r2star_per_s, m1, read_source, algorithm_version, created, m1_note,
        z_flag, follow_up, qsm_note,
    ).datasets
