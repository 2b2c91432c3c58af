"""The BIDS App form of ``qsmnode qsm``: researchers' datasets in, BIDS derivatives out.

- ``layout``: find every MEGRE acquisition of a BIDS dataset (the units of work).
- ``derivatives``: run QSM (and the M1 analysis) on one acquisition and write its BIDS
  derivatives: names, JSON sidecars, NIfTI headers, a status record per acquisition.
- ``cohort``: the group level: one table of every acquisition's measures and QC, and figures.
- ``cluster``: the units of work on Dask distributed (an embedded ``LocalCluster`` or an
  existing scheduler), with progress, skipping finished work and reporting failures by name.

This package is the file edge for researchers (DESIGN.md): the numerical core (``qsm``, ``m1``)
gets arrays from it, and ``qsmnode.cli`` only wires the command line to it.
"""
