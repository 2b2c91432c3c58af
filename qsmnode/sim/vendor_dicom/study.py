"""Patient, study and protocol data of a simulated exam, its deterministic UIDs, the styles and
the vendors they imitate."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from pydicom.uid import EnhancedMRImageStorage, MRImageStorage

STYLES = ("siemens", "siemens-xa", "philips", "enhanced")

MR_IMAGE_STORAGE = str(MRImageStorage)
ENHANCED_MR_IMAGE_STORAGE = str(EnhancedMRImageStorage)

_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://qsmnode/sim/vendor_dicom")
IMPLEMENTATION_CLASS_UID = f"2.25.{uuid.uuid5(_UID_NAMESPACE, 'implementation').int}"
IMPLEMENTATION_VERSION = "QSMNODE_SIM_1"


def sim_uid(*parts: object) -> str:
    """A deterministic ``2.25.`` UID (UUID version 5) from any parts (seed, role, numbers)."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '/'.join(str(p) for p in parts)).int}"


@dataclass(frozen=True)
class SimStudyInfo:
    """Patient, study and protocol data of a simulated exam. All of it is clearly synthetic.

    One seed is one study: the Study and Frame of Reference UIDs depend only on ``seed``;
    series and instance UIDs add the style, series number and instance number.
    """

    seed: int | str = 1
    patient_name: str = "SIM^PHANTOM"
    patient_id: str = "QSMNODE-SIM-0001"
    patient_birth_date: str = ""
    patient_sex: str = "O"
    study_id: str = "SIM1"
    accession_number: str = ""
    study_description: str = "QSMNODE simulated 7T QSM"
    study_date: str = "20240101"
    study_time: str = "090000"
    series_number: int = 5
    series_description: str = "gre_qsm_7T"
    protocol_name: str = "gre_qsm_7T"
    repetition_time_ms: float | None = None
    """None: last echo time + 8 ms."""
    flip_angle_deg: float = 15.0
    pixel_bandwidth_hz: float = 260.0
    institution_name: str = "QSMNODE SIMULATOR"
    station_name: str = "SIM7T"
    slice_thickness_mm: float | None = None
    """None: the slice spacing (contiguous slices, as a 3-D slab). Thinner than the spacing:
    slices with gaps, as a 2-D protocol writes them (with ``acquisition_type`` "2D")."""
    acquisition_type: str = "3D"
    """MRAcquisitionType: "3D", or "2D" for a 2-D multi-slice protocol."""

    @property
    def study_instance_uid(self) -> str:
        return sim_uid(self.seed, "study")

    @property
    def frame_of_reference_uid(self) -> str:
        return sim_uid(self.seed, "frame-of-reference")

    def series_instance_uid(self, style: str, series_number: int) -> str:
        return sim_uid(self.seed, "series", style, series_number)

    def sop_instance_uid(self, style: str, series_number: int, instance_number: int) -> str:
        return sim_uid(self.seed, "instance", style, series_number, instance_number)


@dataclass(frozen=True)
class Vendor:
    """What a scanner of one style says about itself (equipment attributes)."""

    manufacturer: str
    model: str
    software: str
    serial: str


VENDORS = {
    "siemens": Vendor("SIEMENS", "Investigational_Device_7T", "syngo MR E11", "79001"),
    "siemens-xa": Vendor("Siemens Healthineers", "MAGNETOM Terra.X", "syngo MR XA60", "79002"),
    "philips": Vendor("Philips Medical Systems", "Achieva", "5.7.1\\5.7.1.1", "79003"),
    "enhanced": Vendor("Philips Medical Systems", "Achieva", "5.7.1\\5.7.1.1", "79003"),
}
