"""The DICOM edge: converts between DICOM datasets and the arrays of the numerical core."""
