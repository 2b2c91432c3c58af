"""The BIDS App on real multi-echo GRE (ROMEO.jl test data, 3T, TE 4/8/12 ms, in
../shared/data), laid out here as BIDS MEGRE the way dcm2niix writes it (one file per echo and
part, phase in radians, a sidecar per file). Nothing is copied into the repository: the
dataset is written under the test's temporary folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import REPO

TE_S = (0.004, 0.008, 0.012)  # ROMEO.jl tests: TEs = 4:4:12 ms
B0_T = 3.0


@pytest.fixture
def romeo_bids(shared_data: Path, tmp_path: Path) -> tuple[Path, np.ndarray]:
    folder = shared_data / "romeo-3echo-nifti" / "small"
    mag_img, phase_img = nib.load(folder / "Mag.nii"), nib.load(folder / "Phase.nii")
    mag = np.asarray(mag_img.dataobj, dtype=np.float32)
    raw = np.asarray(phase_img.dataobj, dtype=np.float32)
    # stored as arbitrary floats spanning ±0.00367: radians for BIDS (as ROMEO rescales them)
    phase = (raw / np.abs(raw).max() * np.pi).astype(np.float32)
    anat = tmp_path / "bids" / "sub-romeo" / "anat"
    anat.mkdir(parents=True)
    for e, te in enumerate(TE_S, start=1):
        for part, data in (("mag", mag), ("phase", phase)):
            stem = f"sub-romeo_echo-{e}_part-{part}_MEGRE"
            nib.save(nib.Nifti1Image(data[..., e - 1], mag_img.affine), anat / f"{stem}.nii.gz")
            (anat / f"{stem}.json").write_text(json.dumps(
                {"EchoTime": te, "MagneticFieldStrength": B0_T, "EchoNumber": e}))
    return tmp_path / "bids", mag_img.affine


@pytest.mark.slow
def test_bids_app_on_real_data(romeo_bids: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    bids, affine = romeo_bids
    done = subprocess.run(
        [sys.executable, "-m", "qsmnode", "qsm", bids, tmp_path / "out", "participant",
         "--n-workers", "1"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr
    anat = tmp_path / "out" / "qsmnode" / "sub-romeo" / "anat"
    chi_img = nib.load(anat / "sub-romeo_Chimap.nii.gz")
    assert np.allclose(chi_img.affine, affine, atol=1e-4)
    mask = np.asarray(nib.load(anat / "sub-romeo_desc-qsm_mask.nii.gz").dataobj) > 0
    brain = np.asarray(nib.load(anat / "sub-romeo_desc-brain_mask.nii.gz").dataobj) > 0
    chi = np.asarray(chi_img.dataobj)[mask]
    assert mask.sum() > 0.5 * brain.sum()
    assert -0.5 < np.percentile(chi, 1) and np.percentile(chi, 99) < 0.5  # ppm, brain range
    r2s = np.asarray(nib.load(anat / "sub-romeo_R2starmap.nii.gz").dataobj)[brain]
    assert 15 < np.median(r2s) < 60  # 1/s, 3T brain
    side = json.loads((anat / "sub-romeo_Chimap.json").read_text())
    assert side["MagneticFieldStrength"] == B0_T
    assert side["EchoTime"] == list(TE_S)
    assert np.allclose(side["B0Direction"], [0, 0, 1])  # an axial, unrotated grid
