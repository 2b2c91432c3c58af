"""The same-session T1w: a 3D MPRAGE-like series (Siemens-like classic files, single-echo
magnitude, ``GR\\IR`` with an InversionTime) added to a simulated study, for the T1w route of
the M1 analysis."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom.dataelem import DataElement

from qsmnode.acquisition import MultiEchoGRE
from qsmnode.dicom.geometry import frame_stack, plane_geometry
from qsmnode.sim.vendor_dicom.encoding import STORED_MAX, encode_magnitude, magnitude_scale
from qsmnode.sim.vendor_dicom.header import (
    classic_mr_attributes,
    common_attributes,
    ds_list,
    ds_text,
    encode_dataset,
    encode_element,
    folder_name,
    ms_text,
    put,
    tag_vr,
    write_encoded,
)
from qsmnode.sim.vendor_dicom.study import MR_IMAGE_STORAGE, SimStudyInfo


@dataclass(frozen=True)
class T1wProtocol:
    """What a 3D MPRAGE-like T1w series says about itself (Siemens-like classic files).

    ``series_number`` must differ from the GRE's: the series and instance UIDs derive from the
    study seed, a "t1w" role and the series number, so the two never collide.
    """

    series_number: int = 2
    series_description: str = "t1_mprage_sag"
    inversion_time_s: float = 1.05
    echo_time_s: float = 0.00226
    repetition_time_s: float = 2.3
    flip_angle_deg: float = 9.0
    sequence_name: str = "*tfl3d1_16ns"


def write_t1w_dicom(
    image: NDArray[np.floating],
    affine: NDArray[np.float64],
    out_dir: Path,
    study: SimStudyInfo | None = None,
    protocol: T1wProtocol | None = None,
    field_strength_t: float = 7.0,
) -> list[Path]:
    """Write a T1w volume (e.g. from :func:`qsmnode.sim.anatomy.simulate_t1w`) as a classic
    single-echo magnitude MR series of the study ``study``: same Study and Frame of Reference
    UIDs as the GRE written with it, ScanningSequence ``GR\\IR``, InversionTime, SequenceName
    ``*tfl3d1_16ns``, one file per slice (Siemens-like, no rescale). Returns the files in order.

    Args:
        image: ``[i, j, k]`` intensities (any non-negative scale; stored as 12 bits).
        affine: its voxel-to-RAS affine (any orientation with orthogonal i and j).
    """
    volume = np.asarray(image, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"the T1w image must be 3-D [i, j, k], not of shape {volume.shape}")
    protocol = protocol or T1wProtocol()
    study = study or SimStudyInfo()
    series = dataclasses.replace(
        study,
        series_number=protocol.series_number,
        series_description=protocol.series_description,
        protocol_name=protocol.series_description,
        flip_angle_deg=protocol.flip_angle_deg,
        repetition_time_ms=protocol.repetition_time_s * 1000.0,
    )
    # The shared writers take an acquisition: a single echo without phase stands in for it.
    t1w = MultiEchoGRE(
        magnitude=volume[..., None],
        phase=np.broadcast_to(np.float32(0), (*volume.shape, 1)),  # never read
        echo_times_s=(protocol.echo_time_s,),
        affine=np.asarray(affine, dtype=np.float64),
        field_strength_t=field_strength_t,
    )
    _, _, nk = volume.shape
    geo = plane_geometry(t1w.affine, nk)
    style, role = "siemens", "t1w-siemens"
    n = protocol.series_number
    base = common_attributes(t1w, series, style, n)
    base.SeriesInstanceUID = study.series_instance_uid(role, n)
    base.SOPClassUID = MR_IMAGE_STORAGE
    for keyword, value in classic_mr_attributes(t1w, series, geo, philips=False).items():
        put(base, keyword, value)
    scale = magnitude_scale(t1w)
    for keyword, value in {
        "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"],
        "ScanningSequence": ["GR", "IR"],
        "SequenceVariant": ["SK", "SP", "MP"],
        "ScanOptions": "IR",
        "SequenceName": protocol.sequence_name,
        "InversionTime": ms_text(protocol.inversion_time_s),
        "EchoTrainLength": 1,
        "WindowCenter": ds_text(STORED_MAX / 2),
        "WindowWidth": ds_text(STORED_MAX),
    }.items():
        put(base, keyword, value)
    shared = encode_dataset(base)
    stored = frame_stack(encode_magnitude(volume, scale))
    normal = geo.normal
    echo_time = ms_text(protocol.echo_time_s)
    folder = out_dir / f"{n:04d}_{folder_name(series)}"
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for k in range(nk):
        number = k + 1
        uid = study.sop_instance_uid(role, n, number)
        elements = dict(shared)
        for keyword, value in (
            ("SOPInstanceUID", uid),
            ("InstanceNumber", number),
            ("EchoTime", echo_time),
            ("EchoNumbers", "1"),
            ("ImagePositionPatient", ds_list(geo.positions[k])),
            ("SliceLocation", ds_text(float(geo.positions[k] @ normal))),
        ):
            tag, vr = tag_vr(keyword)
            elements[tag] = encode_element(DataElement(tag, vr, value))
        elements[0x7FE00010] = encode_element(DataElement(0x7FE00010, "OW", stored[k].tobytes()))
        path = folder / f"{number:05d}.dcm"
        write_encoded(path, elements, MR_IMAGE_STORAGE, uid)
        written.append(path)
    return written
