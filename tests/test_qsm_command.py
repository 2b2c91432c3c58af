"""`qsmnode qsm`: the QSM engine on BIDS MEGRE NIfTI, for researchers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from qsmnode.dicom.nifti import write_megre
from qsmnode.qsm import DEFAULT_METHOD
from qsmnode.qsm.engine import METHODS, QSMParams
from qsmnode.sim.phantom import Tissue
from qsmnode.sim.scanner import preset, simulate
from tests.conftest import REPO


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qsmnode", "qsm", *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def deep_minus_white(chi_ppm: np.ndarray, truth, inner: np.ndarray) -> float:
    """Mean χ of the deep grey nuclei minus that of white matter away from the mask edge."""
    deep = np.isin(truth.labels, list(range(Tissue.CAUDATE, Tissue.VEIN))) & (chi_ppm != 0)
    wm = (truth.labels == Tissue.WM) & inner
    return float(chi_ppm[deep].mean() - chi_ppm[wm].mean())


def test_qsm_command_writes_maps_with_the_input_affine(tmp_path: Path) -> None:
    sim = simulate(preset("tiny", seed=6))
    write_megre(sim.gre, tmp_path / "in")
    done = run(tmp_path / "in", "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    chi = nib.load(tmp_path / "out" / "chi_ppm.nii.gz")
    assert np.allclose(chi.affine, sim.gre.affine)
    # the maps lie where the truth does: R2* voxel by voxel (measured r = 0.96) and χ away
    # from the mask edge
    truth = sim.truth
    chi_ppm = np.asarray(chi.dataobj)
    r2star = np.asarray(nib.load(tmp_path / "out" / "r2star_per_s.nii.gz").dataobj)
    inside = chi_ppm != 0
    tissue = (truth.labels >= Tissue.GM) & inside
    r = np.corrcoef(r2star[tissue], truth.r2star_per_s[tissue])[0, 1]
    assert r > 0.9, f"R2* correlates {r:.2f} with the truth"
    inner = ndimage.binary_erosion(inside, iterations=2) & (truth.labels >= Tissue.GM)
    r = np.corrcoef(chi_ppm[inner], truth.chi_ppm[inner])[0, 1]
    assert r > 0.5, f"χ correlates {r:.2f} with the truth inside the mask"
    quality = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert quality["method"] == DEFAULT_METHOD == "tfi"
    record = json.loads(json.dumps(QSMParams().to_record(), default=str))
    assert quality["params"] == record and METHODS["tfi"] == QSMParams()
    assert quality["params"]["inversion_method"] == "tfi"

    # the default keeps the deep nuclei's contrast to white matter where single-step TV keeps
    # half of it (measured: truth 0.077 ppm, default 0.069, single-step TV 0.035)
    default = deep_minus_white(chi_ppm, truth, inner)
    done = run(tmp_path / "in", "--out", tmp_path / "sstv", "--method", "single-step-tv")
    assert done.returncode == 0, done.stderr
    sstv_chi = np.asarray(nib.load(tmp_path / "sstv" / "chi_ppm.nii.gz").dataobj)
    sstv = deep_minus_white(sstv_chi, truth, inner)
    expected = deep_minus_white(np.where(inside, truth.chi_ppm, 0), truth, inner)
    print(f"deep nuclei − white matter: truth {expected:.3f}, default {default:.3f}, "
          f"single-step TV {sstv:.3f} ppm")
    assert 0.5 * expected < default < 1.5 * expected and default > sstv + 0.01, \
        (default, sstv, expected)
    quality = json.loads((tmp_path / "sstv" / "quality.json").read_text())
    assert quality["method"] == "single-step-tv"
    failed = run(tmp_path / "in", "--out", tmp_path / "x", "--method", "magic")
    assert failed.returncode == 2 and "--method 'magic': expected one of tfi, single-step-tv, " \
        "pdf-tv-admm" in failed.stderr


def test_qsm_command_names_a_missing_part(tmp_path: Path) -> None:
    sim = simulate(preset("tiny"))
    written = write_megre(sim.gre, tmp_path / "in")
    next(p for p in written if "echo-3_part-phase" in p.name and p.suffix == ".nii").unlink()
    failed = run(tmp_path / "in", "--out", tmp_path / "out")
    assert failed.returncode == 2
    assert "echo 3 has no part-phase file" in failed.stderr and "Traceback" not in failed.stderr


def test_qsm_command_headers_say_mm_and_the_quantity(tmp_path: Path) -> None:
    sim = simulate(preset("tiny", seed=2))
    write_megre(sim.gre, tmp_path / "in")
    done = run(tmp_path / "in", "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    for name, quantity in (("chi_ppm", b"chi (ppm)"), ("r2star_per_s", b"R2* (1/s)"),
                           ("brain_mask", b"brain mask")):
        header = nib.load(tmp_path / "out" / f"{name}.nii.gz").header
        assert header.get_xyzt_units()[0] == "mm"
        assert quantity in header["descrip"].tobytes()
    assert not list((tmp_path / "out").glob(".*tmp*")), "a temporary file was left behind"


def test_a_bids_root_in_the_single_folder_form_says_how_to_run_it(tmp_path: Path) -> None:
    (tmp_path / "bids" / "sub-01" / "anat").mkdir(parents=True)
    failed = run(tmp_path / "bids", "--out", tmp_path / "out")
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert "no *_echo-N_part-mag|phase_MEGRE.nii[.gz] files" in failed.stderr
    assert "qsmnode qsm BIDS_DIR OUTPUT_DIR participant" in failed.stderr


def test_the_two_forms_are_not_mixed(tmp_path: Path) -> None:
    neither = run(tmp_path)
    assert neither.returncode == 2 and "give --out DIR" in neither.stderr
    no_level = run(tmp_path, tmp_path / "out")
    assert no_level.returncode == 2
    assert "OUTPUT_DIR needs an analysis level after it" in no_level.stderr
    both = run(tmp_path, tmp_path / "out", "participant", "--out", tmp_path / "x")
    assert both.returncode == 2 and "--out is for the single-folder form" in both.stderr
    bad_level = run(tmp_path, tmp_path / "out", "subject")
    assert bad_level.returncode == 2 and "invalid choice: 'subject'" in bad_level.stderr
