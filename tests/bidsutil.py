"""Helpers for the BIDS App tests: a BIDS dataset written from a simulated head."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from qsmnode.acquisition import MultiEchoGRE
from qsmnode.dicom.nifti import write_megre
from qsmnode.sim.scanner import Simulation


def shifted(gre: MultiEchoGRE, mm: float) -> MultiEchoGRE:
    affine = gre.affine.copy()
    affine[0, 3] += mm
    return dataclasses.replace(gre, affine=affine)


def write_cohort(root: Path, sim: Simulation, good: dict[str, tuple[str, float]],
                 bad: dict[str, tuple[str, float]] | None = None) -> Path:
    """A BIDS dataset of the simulated head, one acquisition per entry (name: (folder, shift
    in mm)); of the ``bad`` entries, ``sub-03`` gets an echo of another size and ``sub-04``
    loses a phase echo."""
    for name, (folder, mm) in {**good, **(bad or {})}.items():
        write_megre(shifted(sim.gre, mm), root / folder, prefix=name)
    if bad and "sub-03" in bad:
        path = root / "sub-03/anat/sub-03_echo-2_part-mag_MEGRE.nii"
        img = nib.load(path, mmap=False)  # not mapped: the file is replaced below
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :-2], img.affine), path)
    if bad and "sub-04" in bad:
        (root / "sub-04/anat/sub-04_echo-3_part-phase_MEGRE.nii").unlink()
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "simulated cohort", "BIDSVersion": "1.10.0"}) + "\n")
    return root
