"""A synthetic 7T scanner: a head phantom with known susceptibility, its physics, and DICOM."""
