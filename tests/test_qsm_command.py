"""`qsmnode qsm`: the QSM engine on BIDS MEGRE NIfTI, for researchers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from qsmnode.dicom.nifti import write_megre
from qsmnode.sim.phantom import Tissue
from qsmnode.sim.scanner import preset, simulate
from tests.conftest import REPO


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qsmnode", "qsm", *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_qsm_command_writes_maps_with_the_input_affine(tmp_path: Path) -> None:
    sim = simulate(preset("tiny", seed=6))
    write_megre(sim.gre, tmp_path / "in")
    done = run(tmp_path / "in", "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    chi = nib.load(tmp_path / "out" / "chi_ppm.nii.gz")
    assert np.allclose(chi.affine, sim.gre.affine)
    tissue = (sim.truth.labels >= Tissue.GM) & (np.asarray(chi.dataobj) != 0)
    corr = np.corrcoef(np.asarray(chi.dataobj)[tissue], sim.truth.chi_ppm[tissue])[0, 1]
    assert corr > 0.5, f"χ correlates {corr:.2f} with the truth"
    assert (tmp_path / "out" / "quality.json").exists()


def test_qsm_command_names_a_missing_part(tmp_path: Path) -> None:
    sim = simulate(preset("tiny"))
    written = write_megre(sim.gre, tmp_path / "in")
    next(p for p in written if "echo-3_part-phase" in p.name and p.suffix == ".nii").unlink()
    failed = run(tmp_path / "in", "--out", tmp_path / "out")
    assert failed.returncode == 2
    assert "echo 3 has no part-phase file" in failed.stderr and "Traceback" not in failed.stderr
