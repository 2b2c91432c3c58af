"""The coded concepts of the derived objects, in one place.

Every code below is from DICOM PS3.16 (checked against pydicom's copy of its tables) unless the
comment says otherwise.

No SNOMED CT concept for "primary motor cortex" could be verified from the references at hand, so
a segment's property type is SCT "Cerebral cortex" (CID 7151), its laterality a modifier (CID 244)
and "primary motor cortex" is given as its primary anatomic structure with the Uberon code
UBERON:0001384 (declared in the Coding Scheme Identification Sequence). The label and
description name the area (Penfield's hand or foot) and the depth bin.
"""

from __future__ import annotations

from typing import Final

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

# --- segmentation ----------------------------------------------------------------------------

ANATOMICAL_STRUCTURE: Final = codes.SCT.AnatomicalStructure  # 91723000, CID 7150
CEREBRAL_CORTEX: Final = codes.SCT.CerebralCortex  # 40146001, CID 7151
LEFT: Final = codes.SCT.Left  # 7771000, CID 244
RIGHT: Final = codes.SCT.Right  # 24028007, CID 244
PRIMARY_MOTOR_CORTEX: Final = Code("UBERON:0001384", "UBERON", "primary motor cortex")
"""Uber-anatomy ontology (http://purl.obolibrary.org/obo/UBERON_0001384)."""

UBERON_SCHEME: Final = CodingSchemeIdentificationItem(
    designator="UBERON",
    name="Uber Anatomy Ontology",
    external_id="http://purl.obolibrary.org/obo/uberon.owl",
    responsible_organization="Uberon consortium (obophenotype)",
)

# --- measurements (CID 7469 / 7180 / 7464) ----------------------------------------------------

MAGNETIC_SUSCEPTIBILITY: Final = codes.DCM.MagneticSusceptibility  # 126396
R2STAR: Final = codes.DCM.R2Star  # 126395
T2STAR_WEIGHTED_SIGNAL: Final = codes.DCM.T2StarWeightedMRSignalIntensity
THICKNESS: Final = Code("59089-3", "LN", "Thickness")  # CID 12304
VOLUME: Final = codes.SCT.Volume  # 118565006
QUANTITY: Final = codes.SCT.Quantity  # 246205007 (voxel count, unit {voxels})
MEAN: Final = codes.SCT.Mean  # 373098007
STANDARD_DEVIATION: Final = codes.SCT.StandardDeviation  # 386136009
MEDIAN: Final = codes.SCT.Median  # 373099004
Z_SCORE: Final = codes.DCM.ZScoreOfMeasurement  # 121416, CID 227 (TID 311)

# --- units (UCUM, CID 7181 where listed) ------------------------------------------------------

PPM: Final = Code("ppm", "UCUM", "ppm")  # CID 7181 spelling; strict UCUM is [ppm]
PER_SECOND: Final = Code("/s", "UCUM", "/s")
MILLIMETER: Final = codes.UCUM.Millimeter
CUBIC_MILLIMETER: Final = codes.UCUM.CubicMillimeter
RATIO: Final = codes.UCUM.Ratio  # {ratio}
VOXELS: Final = Code("{voxels}", "UCUM", "voxels")
NO_UNITS: Final = codes.UCUM.NoUnits  # 1

# --- report -----------------------------------------------------------------------------------

IMAGING_PROCEDURE: Final = codes.SCT.ImagingProcedure  # 363679005, CID 100
"""CID 100 has no code for QSM or brain MRI; the generic imaging procedure is the closest."""
FINDING_SITE_BRAIN_CORTEX: Final = codes.SCT.CerebralCortex
QUALITY_CONTROL: Final = codes.DCM.QualityControl  # 110002
PRESENT: Final = codes.SCT.Present
ABSENT: Final = codes.SCT.Absent
YES: Final = codes.SCT.Yes
NO: Final = codes.SCT.No
ANATOMY_COVERAGE_INCOMPLETE: Final = codes.DCM.AnatomyCoverageIncomplete  # 130576

# --- follow-up and protocol ------------------------------------------------------------------

PRIVATE_SCHEME: Final = "99QSMNODE"
"""qsmnode's own concepts (quality flags, regions, protocol, follow-up), declared in each SR's
Coding Scheme Identification Sequence."""

MAGNETIC_FIELD_STRENGTH: Final = codes.DCM.MagneticFieldStrength  # 130542
TESLA: Final = Code("T", "UCUM", "T")
MILLISECOND: Final = codes.UCUM.Millisecond
YEAR: Final = Code("a", "UCUM", "year")
PRIOR_REPORT: Final = codes.DCM.PriorReportForCurrentPatient  # 122075, CID 3407
