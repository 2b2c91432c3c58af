"""The classic writer: one MR Image Storage file per slice per echo, in the series layout of
each style (``siemens``, ``siemens-xa``, ``philips``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataelem import DataElement

from qsmnode.acquisition import MultiEchoGRE
from qsmnode.dicom.geometry import plane_geometry
from qsmnode.sim.vendor_dicom.encoding import (
    PHILIPS_PHASE_INTERCEPT,
    PHILIPS_PHASE_SLOPE,
    PHILIPS_PHASE_SLOPE_TEXT,
    SIEMENS_PHASE_INTERCEPT,
    SIEMENS_PHASE_SLOPE,
    STORED_MAX,
    encode_echoes,
    encode_magnitude,
    encode_phase_philips,
    encode_phase_siemens,
    magnitude_scale,
)
from qsmnode.sim.vendor_dicom.header import (
    classic_mr_attributes,
    clone,
    common_attributes,
    ds_list,
    ds_text,
    encode_dataset,
    encode_element,
    folder_name,
    ms_text,
    put,
    real_world_value_mapping,
    seq,
    tag_vr,
    write_encoded,
)
from qsmnode.sim.vendor_dicom.study import MR_IMAGE_STORAGE, SimStudyInfo

PHILIPS_PRIVATE_CREATOR = "Philips MR Imaging DD 001"
"""Owner of block 0x10 of group 2005, which holds (2005,1011) ImageTypeMR ("M"/"P")."""
PHILIPS_IMAGING_CREATOR = "Philips Imaging DD 001"


@dataclass
class _Part:
    """Magnitude or phase: stored pixels per echo (``[k, Rows, Columns]``) and its attributes."""

    name: str  # "M" or "P"
    frames: list[NDArray[np.uint16]]
    attrs: dict[str, Any]


def _parts(gre: MultiEchoGRE, style: str) -> list[_Part]:
    """Magnitude and phase, encoded and described as the vendor of ``style`` writes them."""
    scale = magnitude_scale(gre)
    mag = encode_echoes(gre.magnitude, lambda m: encode_magnitude(m, scale))
    if style in ("siemens", "siemens-xa"):
        return [
            _Part(
                "M",
                mag,
                {
                    "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"],
                    "WindowCenter": ds_text(STORED_MAX / 2),
                    "WindowWidth": ds_text(STORED_MAX),
                },
            ),
            _Part(
                "P",
                encode_echoes(gre.phase, encode_phase_siemens),
                {
                    "ImageType": ["ORIGINAL", "PRIMARY", "P", "ND"],
                    "RescaleIntercept": ds_text(SIEMENS_PHASE_INTERCEPT),
                    "RescaleSlope": ds_text(SIEMENS_PHASE_SLOPE),
                    "RescaleType": "US",
                    "WindowCenter": "0",
                    "WindowWidth": "8192",
                },
            ),
        ]
    slope = 1.0 / scale
    return [
        _Part(
            "M",
            mag,
            {
                "ImageType": ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"],
                "RescaleIntercept": "0",
                "RescaleSlope": ds_text(slope),
                "RescaleType": "normalized",
                "WindowCenter": ds_text(STORED_MAX * slope / 2),
                "WindowWidth": ds_text(STORED_MAX * slope),
                "RealWorldValueMappingSequence": seq(
                    real_world_value_mapping(
                        slope, 0.0, "1", "no units", "Real World Value Mapping for normalized"
                    )
                ),
            },
        ),
        _Part(
            "P",
            encode_echoes(gre.phase, encode_phase_philips),
            {
                "ImageType": ["ORIGINAL", "PRIMARY", "PHASE MAP", "P", "FFE"],
                "RescaleIntercept": ds_text(PHILIPS_PHASE_INTERCEPT),
                "RescaleSlope": PHILIPS_PHASE_SLOPE_TEXT,
                "RescaleType": "mrad",
                "WindowCenter": "0",
                "WindowWidth": "6284",
                "RealWorldValueMappingSequence": seq(
                    real_world_value_mapping(
                        PHILIPS_PHASE_SLOPE,
                        PHILIPS_PHASE_INTERCEPT,
                        "mrad",
                        "milliradian",
                        "Real World Value Mapping for mrad",
                    )
                ),
            },
        ),
    ]


@dataclass
class _Series:
    """One series of the layout: its number, folder, parts, echoes, and whether its files carry
    EchoNumbers."""

    number: int
    folder: str
    parts: list[_Part]
    echoes: list[int]
    echo_numbers: bool


def _instance_order(series: _Series, nk: int, style: str) -> list[tuple[_Part, int, int]]:
    """(part, echo, slice) of each instance, in instance-number order."""
    if style == "philips":  # parts, then slices, echo fastest
        return [(p, e, k) for p in series.parts for k in range(nk) for e in series.echoes]
    return [(p, e, k) for p in series.parts for e in series.echoes for k in range(nk)]


def _series_layout(gre: MultiEchoGRE, study: SimStudyInfo, style: str) -> list[_Series]:
    """The series a scanner of ``style`` writes the acquisition as (see the styles)."""
    n = study.series_number
    echoes = list(range(gre.n_echoes))
    mag, ph = _parts(gre, style)
    safe = folder_name(study)
    if style == "siemens":
        return [
            _Series(n, f"{n:04d}_{safe}_M", [mag], echoes, True),
            _Series(n + 1, f"{n + 1:04d}_{safe}_P", [ph], echoes, True),
        ]
    if style == "siemens-xa":
        ne = gre.n_echoes
        return [
            _Series(n + e, f"{n + e:04d}_{safe}_M_e{e + 1}", [mag], [e], False) for e in echoes
        ] + [
            _Series(n + ne + e, f"{n + ne + e:04d}_{safe}_P_e{e + 1}", [ph], [e], False)
            for e in echoes
        ]
    return [_Series(n, f"{n:04d}_{safe}", [mag, ph], echoes, True)]


def write_classic(
    gre: MultiEchoGRE, out_dir: Path, style: str, study: SimStudyInfo
) -> list[Path]:
    """Write ``gre`` as classic single-frame files of ``style``; return them in order."""
    philips = style == "philips"
    _, _, nk = gre.shape
    geo = plane_geometry(gre.affine, nk)
    normal = geo.normal
    slice_locations = [ds_text(float(p @ normal)) for p in geo.positions]
    positions = [ds_list(p) for p in geo.positions]
    echo_times = [ms_text(te) for te in gre.echo_times_s]
    mr_attrs = classic_mr_attributes(gre, study, geo, philips)
    written: list[Path] = []
    for series in _series_layout(gre, study, style):
        base = common_attributes(gre, study, style, series.number)
        base.SOPClassUID = MR_IMAGE_STORAGE
        for keyword, value in mr_attrs.items():
            put(base, keyword, value)
        if philips:
            imaging = base.private_block(0x2001, PHILIPS_IMAGING_CREATOR, create=True)
            imaging.add_new(0x14, "SL", gre.n_echoes)  # number of echoes
            imaging.add_new(0x18, "SL", nk)  # number of slices
        part_bytes = {}
        for part in series.parts:
            pb = clone(base)
            for keyword, value in part.attrs.items():
                put(pb, keyword, value)
            if philips:
                pb.private_block(0x2005, PHILIPS_PRIVATE_CREATOR, create=True).add_new(
                    0x11, "CS", part.name
                )
            part_bytes[part.name] = encode_dataset(pb)
        folder = out_dir / series.folder
        folder.mkdir(parents=True, exist_ok=True)
        order = _instance_order(series, nk, style)
        for number, (part, e, k) in enumerate(order, start=1):
            uid = study.sop_instance_uid(style, series.number, number)
            varying = [
                ("SOPInstanceUID", uid),
                ("InstanceNumber", number),
                ("EchoTime", echo_times[e]),
                ("ImagePositionPatient", positions[k]),
                ("SliceLocation", slice_locations[k]),
            ]
            if series.echo_numbers:
                varying.append(("EchoNumbers", str(e + 1)))
            elements = dict(part_bytes[part.name])
            for keyword, value in varying:
                tag, vr = tag_vr(keyword)
                elements[tag] = encode_element(DataElement(tag, vr, value))
            if philips:
                elements[0x2001100A] = encode_element(DataElement(0x2001100A, "IS", str(k + 1)))
            pixels = part.frames[e][k].tobytes()
            elements[0x7FE00010] = encode_element(DataElement(0x7FE00010, "OW", pixels))
            path = folder / f"{number:05d}.dcm"
            write_encoded(path, elements, MR_IMAGE_STORAGE, uid)
            written.append(path)
    return written
