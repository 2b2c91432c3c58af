"""qsmnode: a scanner-side DICOM node for 7T QSM and M1 analysis."""

__version__ = "0.1.0"
