"""The simulated scanner's DICOM writer: what real Siemens and Philips scanners send.

``write_dicom(gre, out_dir, style)`` writes one multi-echo GRE acquisition the way a vendor does,
so that the receiver, the grouping and the loader are tested against the pitfalls of real files
(DOMAIN.md, "Vendor DICOM pitfalls"). Styles:

``siemens`` (syngo E11-like)
    Classic MR Image Storage, one file per slice per echo. Magnitude in series ``n``, phase in
    series ``n + 1``, same SeriesDescription. ImageType ``ORIGINAL\\PRIMARY\\M\\ND`` or
    ``...\\P\\ND``. Instance numbers run slice-fastest, echo by echo.
``siemens-xa`` (XA "interoperability" export)
    As ``siemens`` but each echo is its own series and EchoNumbers is absent: magnitude echo
    ``e`` in series ``n + e``, phase echo ``e`` in series ``n + E + e`` (``E`` echoes). Group by
    EchoTime. Manufacturer "Siemens Healthineers".
``philips`` (R5-like classic)
    One series holding magnitude and phase of every echo. ImageType
    ``ORIGINAL\\PRIMARY\\M_FFE\\M\\FFE`` / ``ORIGINAL\\PRIMARY\\PHASE MAP\\P\\FFE`` and private
    (2005,1011) ``M``/``P`` (creator "Philips MR Imaging DD 001", which owns block 10 of group
    2005). Instances: all magnitude frames (slice-major, echo fastest), then all phase frames.
``enhanced`` (Philips-like Enhanced MR)
    One Enhanced MR Image Storage file with every frame (magnitude then phase, slice, echo
    fastest) like the real Philips sample. Per frame: FrameType ``...\\M``/``...\\P``,
    ComplexImageComponent MAGNITUDE/PHASE, EffectiveEchoTime, rescale and plane position.

``write_t1w_dicom(image, affine, out_dir, study)`` adds a same-session 3D MPRAGE-like T1w
(Siemens-like classic files, single-echo magnitude, ``GR\\IR`` with an InversionTime) to the
study, for the T1w route of the M1 analysis.

Pixel encodings (all uint16, 12 bits stored):

- Magnitude: ``stored = round(magnitude * s)`` with ``s = 4095 / max(magnitude)`` over all
  echoes (:func:`magnitude_scale`), so the echo decay is kept. Philips and enhanced record
  RescaleSlope ``1/s`` (values come back in the input units); Siemens writes no rescale tags,
  like real E11 magnitude, so its values are ``magnitude * s`` in arbitrary units.
- Siemens phase: ``stored`` 0..4095, RescaleSlope 2, RescaleIntercept -4096;
  ``radians = (2 * stored - 4096) * π / 4096``.
- Philips phase: ``stored`` 0..4095, RescaleSlope 6284/4095 (1.53455…), RescaleIntercept -3142,
  RescaleType ``mrad``; ``radians = (stored * slope - 3142) / 1000``.

Geometry follows :mod:`qsmnode.dicom.geometry` (``i`` = column, ``j`` = row, ``k`` = slice).
UIDs are deterministic: study, frame of reference, series and instances derive from
``SimStudyInfo.seed`` (UUID-5 based ``2.25.`` UIDs), so the same seed writes the same UIDs.

The modules: :mod:`~qsmnode.sim.vendor_dicom.study` (study data, UIDs, styles and vendors),
:mod:`~qsmnode.sim.vendor_dicom.encoding` (pixel encodings),
:mod:`~qsmnode.sim.vendor_dicom.header` (dataset helpers and the attributes every style shares),
:mod:`~qsmnode.sim.vendor_dicom.classic` (single-frame files: Siemens, Siemens XA, Philips),
:mod:`~qsmnode.sim.vendor_dicom.enhanced` (the Enhanced MR file) and
:mod:`~qsmnode.sim.vendor_dicom.t1w` (the same-session T1w). Importers use this package, which
re-exports their public names. Like the rest of :mod:`qsmnode.sim`, it imports no method code
(:mod:`qsmnode.qsm`, :mod:`qsmnode.m1`).
"""

from __future__ import annotations

from pathlib import Path

from qsmnode.acquisition import MultiEchoGRE
from qsmnode.sim.vendor_dicom.classic import (
    PHILIPS_IMAGING_CREATOR,
    PHILIPS_PRIVATE_CREATOR,
    write_classic,
)
from qsmnode.sim.vendor_dicom.encoding import (
    PHILIPS_PHASE_INTERCEPT,
    PHILIPS_PHASE_SLOPE,
    PHILIPS_PHASE_SLOPE_TEXT,
    SIEMENS_PHASE_INTERCEPT,
    SIEMENS_PHASE_SLOPE,
    STORED_MAX,
    encode_magnitude,
    encode_phase_philips,
    encode_phase_siemens,
    magnitude_scale,
)
from qsmnode.sim.vendor_dicom.enhanced import write_enhanced
from qsmnode.sim.vendor_dicom.study import (
    ENHANCED_MR_IMAGE_STORAGE,
    MR_IMAGE_STORAGE,
    STYLES,
    SimStudyInfo,
    sim_uid,
)
from qsmnode.sim.vendor_dicom.t1w import T1wProtocol, write_t1w_dicom

__all__ = [
    "ENHANCED_MR_IMAGE_STORAGE",
    "MR_IMAGE_STORAGE",
    "PHILIPS_IMAGING_CREATOR",
    "PHILIPS_PHASE_INTERCEPT",
    "PHILIPS_PHASE_SLOPE",
    "PHILIPS_PHASE_SLOPE_TEXT",
    "PHILIPS_PRIVATE_CREATOR",
    "SIEMENS_PHASE_INTERCEPT",
    "SIEMENS_PHASE_SLOPE",
    "STORED_MAX",
    "STYLES",
    "SimStudyInfo",
    "T1wProtocol",
    "encode_magnitude",
    "encode_phase_philips",
    "encode_phase_siemens",
    "magnitude_scale",
    "sim_uid",
    "write_dicom",
    "write_t1w_dicom",
]


def write_dicom(
    gre: MultiEchoGRE, out_dir: Path, style: str, study: SimStudyInfo | None = None
) -> list[Path]:
    """Write ``gre`` as a scanner of ``style`` would; return the written files in order.

    Args:
        gre: the acquisition (magnitude, wrapped phase, echo times, affine, B0).
        out_dir: created if needed; one subfolder per series.
        style: one of :data:`STYLES`.
        study: patient/study data and UID seed; default ``SimStudyInfo()``.
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}: expected one of {STYLES}")
    study = study or SimStudyInfo()
    out_dir = Path(out_dir)
    if style == "enhanced":
        return write_enhanced(gre, out_dir, style, study)
    return write_classic(gre, out_dir, style, study)
