"""What every derived-object builder shares: the build context, the source images, the geometry
and the identity (series numbers, UIDs, equipment) of the objects.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from qsmnode.dicom.derived.uids import DerivedUids
from qsmnode.dicom.geometry import PlaneGeometry, plane_geometry
from qsmnode.dicom.load import LoadedAcquisition, SourceRef

ALGORITHM_NAME = "qsmnode"
"""Algorithm name in every derived object (and the manufacturer of the derived objects)."""

MANUFACTURER = "qsmnode"
MODEL_NAME = "qsmnode QSM/M1"
DEVICE_SERIAL_NUMBER = "qsmnode"
ALGORITHM_FAMILY = codes.DCM.ArtificialIntelligence
"""CID 7162 has no better family for a classic (non-learned) image-processing pipeline; the
registration step of the M1 analysis is what it is closest to."""

ReadSource = Callable[[str], Dataset]
"""Returns the dataset of a source image from its SOP Instance UID. The header is enough
(``stop_before_pixels``); for a multi-frame image the whole header with its functional groups."""

SERIES_OFFSETS = {
    "qsm-pm": 1,
    "qsm-mr": 2,
    "r2s-pm": 3,
    "r2s-mr": 4,
    "seg": 5,
    "sr": 6,
    "sc": 7,
}
"""Series number of each derived series: 100 × the source series number + this offset (source
series 5 → 501..507; 9900 + offset when the source has no series number)."""


class SourceImages:
    """The source images of an acquisition, read once each through a :data:`ReadSource`.

    Echo 1 of the magnitude is *the* source of every derived object; the other echoes (and the
    phase, for QSM) are further sources.
    """

    def __init__(self, loaded: LoadedAcquisition, read_source: ReadSource) -> None:
        self.loaded = loaded
        self._read = read_source
        self._cache: dict[str, Dataset] = {}

    def dataset(self, sop_instance_uid: str) -> Dataset:
        ds = self._cache.get(sop_instance_uid)
        if ds is None:
            ds = self._read(sop_instance_uid)
            if ds.SOPInstanceUID != sop_instance_uid:
                raise ValueError(
                    f"read_source({sop_instance_uid}) returned instance {ds.SOPInstanceUID}"
                )
            self._cache[sop_instance_uid] = ds
        return ds

    def slice_source(self, k: int) -> SourceRef:
        """The echo-1 magnitude source of slice ``k``."""
        return self.loaded.magnitude_sources[k][0]

    def echo1_uids(self) -> list[str]:
        """SOP Instance UIDs of the echo-1 magnitude images, once each, in slice order."""
        return _unique(row[0].sop_instance_uid for row in self.loaded.magnitude_sources)

    def echo1(self) -> list[Dataset]:
        """The echo-1 magnitude datasets in slice order (one multi-frame dataset for Enhanced)."""
        return [self.dataset(uid) for uid in self.echo1_uids()]

    def further_uids(self, include_phase: bool) -> list[str]:
        """SOP Instance UIDs of the other magnitude echoes (and the phase), minus echo 1."""
        loaded = self.loaded
        refs = [ref for row in loaded.magnitude_sources for ref in row[1:]]
        if include_phase and loaded.phase_sources is not None:
            refs += [ref for row in loaded.phase_sources for ref in row]
        echo1 = set(self.echo1_uids())
        return [uid for uid in _unique(r.sop_instance_uid for r in refs) if uid not in echo1]

    def further(self, include_phase: bool) -> list[Dataset]:
        return [self.dataset(uid) for uid in self.further_uids(include_phase)]


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


@dataclass
class BuildContext:
    """Everything one run of the builders shares."""

    loaded: LoadedAcquisition
    sources: SourceImages
    uids: DerivedUids
    algorithm_version: str
    created: dt.datetime
    geometry: PlaneGeometry = field(init=False)

    def __post_init__(self) -> None:
        self.geometry = plane_geometry(self.loaded.gre.affine, self.loaded.gre.shape[2])

    @classmethod
    def create(
        cls,
        loaded: LoadedAcquisition,
        read_source: ReadSource,
        algorithm_version: str,
        created: dt.datetime | None = None,
    ) -> BuildContext:
        uids = DerivedUids.for_acquisition(loaded, ALGORITHM_NAME, algorithm_version)
        return cls(
            loaded=loaded,
            sources=SourceImages(loaded, read_source),
            uids=uids,
            algorithm_version=str(algorithm_version),
            created=created or dt.datetime.now(),
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.loaded.gre.shape

    def series_number(self, role: str) -> int:
        numbers = [n for n in self.loaded.series_numbers if n is not None]
        base = 100 * min(numbers) if numbers else 9900
        return base + SERIES_OFFSETS[role]

    def series_uid(self, role: str) -> str:
        return self.uids.uid(f"{role}/series")

    def instance_uid(self, role: str, index: int = 0) -> str:
        return self.uids.uid(f"{role}/instance", index)

    @property
    def software_versions(self) -> str:
        return f"{ALGORITHM_NAME} {self.algorithm_version}"

    def highdicom_kwargs(self, role: str, index: int = 0) -> dict[str, Any]:
        """Identity keywords for a highdicom SOP class constructor (one instance per series,
        unless ``index`` says otherwise)."""
        return {
            "series_instance_uid": self.series_uid(role),
            "series_number": self.series_number(role),
            "sop_instance_uid": self.instance_uid(role, index),
            "instance_number": index + 1,
            "manufacturer": MANUFACTURER,
        }

    def dates(self) -> dict[str, Any]:
        """Series and content date/time (the build time) for highdicom constructors."""
        return {
            "series_date": self.created.date(),
            "series_time": self.created.time(),
            "content_date": self.created.date(),
            "content_time": self.created.time(),
        }

    def algorithm_identification(self) -> hd.AlgorithmIdentificationSequence:
        return hd.AlgorithmIdentificationSequence(
            name=ALGORITHM_NAME,
            family=ALGORITHM_FAMILY,
            version=self.algorithm_version,
            source=MANUFACTURER,
        )

    @property
    def body_part(self) -> str:
        return str(self.loaded.patient_study.get("BodyPartExamined") or "HEAD")

    # --- geometry for highdicom ----------------------------------------------------------

    def plane_positions(self) -> list[hd.PlanePositionSequence]:
        return [
            hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, _rounded(p))
            for p in self.geometry.positions
        ]

    def plane_orientation(self) -> hd.PlaneOrientationSequence:
        return hd.PlaneOrientationSequence(
            hd.CoordinateSystemNames.PATIENT, _rounded(self.geometry.orientation)
        )

    def pixel_measures(self) -> hd.PixelMeasuresSequence:
        g = self.geometry
        return hd.PixelMeasuresSequence(
            pixel_spacing=_rounded(g.pixel_spacing),
            slice_thickness=float(f"{g.slice_spacing:.6g}"),
            spacing_between_slices=float(f"{g.slice_spacing:.6g}"),
        )


def _rounded(values: Iterable[float] | NDArray[np.floating]) -> list[float]:
    """Floats that fit a DS (16 characters) without losing more than ~1e-6 mm."""
    return [float(f"{float(v):.10g}") for v in values]


def set_dimension_organization_uid(ds: Dataset, uid: str) -> None:
    """Replace highdicom's random Dimension Organization UID with a deterministic one."""
    for item in ds.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = uid
    for item in ds.get("DimensionIndexSequence", []):
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = uid


def source_reader(paths: Iterable[str | os.PathLike[str]]) -> ReadSource:
    """A :data:`ReadSource` over files: each header is read once (without pixel data) and
    indexed by SOP Instance UID. Unreadable files are skipped."""
    index: dict[str, Dataset] = {}
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError):
            continue
        uid = ds.get("SOPInstanceUID")
        if uid:
            index[str(uid)] = ds

    def read(sop_instance_uid: str) -> Dataset:
        try:
            return index[sop_instance_uid]
        except KeyError:
            raise KeyError(f"source instance {sop_instance_uid} not among the files") from None

    return read
