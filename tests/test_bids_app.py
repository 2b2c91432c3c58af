"""`qsmnode qsm BIDS_DIR OUTPUT_DIR participant|group`: the BIDS App, end to end.

The cohort is made here by the project's simulator (coarse, "tiny" preset): sub-01 with two
sessions, sub-02 with acq- and run- entities, sub-03 whose second echo has another shape and
sub-04 missing a phase echo. Each acquisition is the same simulated head with its affine moved
by a different number of mm, so each derivative's affine tells which input it came from. The
truth (R2*, χ, brain mask) comes from the simulator, never from the code under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qsmnode import __version__
from qsmnode.sim.phantom import Tissue
from qsmnode.sim.scanner import Simulation, preset, simulate
from tests.bidsutil import write_cohort
from tests.conftest import REPO

GOOD = {  # acquisition name -> (folder, shift of the affine in mm along x)
    "sub-01_ses-1": ("sub-01/ses-1/anat", 0.0),
    "sub-01_ses-2": ("sub-01/ses-2/anat", 1.0),
    "sub-02_acq-fast_run-1": ("sub-02/anat", 2.0),
}
BAD = {
    "sub-03": ("sub-03/anat", 3.0),  # echo 2 magnitude cropped: mismatched shapes
    "sub-04": ("sub-04/anat", 4.0),  # echo 3 phase missing
}
MAPS = ("Chimap", "R2starmap", "T2starmap", "desc-echocombined_T2starw", "desc-brain_mask",
        "desc-qsm_mask", "desc-total_fieldmap", "desc-local_fieldmap")


def qsm(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qsmnode", "qsm", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def sim() -> Simulation:
    return simulate(preset("tiny", seed=3))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory, sim: Simulation) -> Path:
    return write_cohort(tmp_path_factory.mktemp("bids"), sim, GOOD, BAD)


@pytest.fixture(scope="module")
def participant(cohort: Path, tmp_path_factory: pytest.TempPathFactory,
                ) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("derivatives")
    return out, qsm(cohort, out, "participant", "--n-workers", "2")


def anat(out: Path, name: str) -> Path:
    return out / "qsmnode" / GOOD[name][0]


pytestmark = pytest.mark.slow


def test_participant_level_processes_the_good_and_names_the_bad(
        participant: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    _, done = participant
    said = done.stdout + done.stderr
    assert done.returncode == 1, said  # two acquisitions failed
    assert "Traceback" not in done.stderr, said
    assert "5 MEGRE acquisition(s) of 4 subject(s)" in done.stdout, said
    assert "3 done, 0 skipped (finished before), 2 failed" in done.stdout, said
    assert "error: sub-03: " in done.stderr
    assert "shape (56, 68, 38) differs from the first echo's (56, 68, 40)" in done.stderr
    assert "error: sub-04: echo 3 has no part-phase file" in done.stderr
    for name in GOOD:
        assert f"{name}: done in" in done.stdout


def test_derivatives_have_bids_names_headers_and_sidecars(
        participant: tuple[Path, subprocess.CompletedProcess[str]], sim: Simulation) -> None:
    out, _ = participant
    root = out / "qsmnode"
    description = json.loads((root / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    (generated,) = description["GeneratedBy"]
    assert generated["Name"] == "qsmnode" and generated["Version"] == __version__
    from qsmnode.qsm.engine import METHODS

    recorded = generated["Parameters"]["qsm"]
    assert recorded == json.loads(json.dumps(
        METHODS[generated["Parameters"]["qsm_method"]].to_record()))
    assert {"background_method", "inversion_method", "mask_threshold"} <= set(recorded)
    for name, (folder, mm) in GOOD.items():
        files = sorted(p.name for p in (root / folder).iterdir())
        expected = sorted(f"{name}_{m}{ext}" for m in MAPS for ext in (".nii.gz", ".json"))
        assert files == expected
        truth_affine = sim.gre.affine.copy()
        truth_affine[0, 3] += mm
        rot = truth_affine[:3, :3] / np.linalg.norm(truth_affine[:3, :3], axis=0)
        b0 = rot.T @ np.array([0.0, 0.0, 1.0])
        for m in MAPS:
            img = nib.load(root / folder / f"{name}_{m}.nii.gz")
            assert np.allclose(img.affine, truth_affine, atol=1e-4), (name, m)
            assert img.header.get_xyzt_units()[0] == "mm"
            assert img.shape == sim.gre.shape
            side = json.loads((root / folder / f"{name}_{m}.json").read_text())
            assert side["SoftwareVersion"] == __version__
            assert side["EchoTime"] == pytest.approx(list(sim.gre.echo_times_s))
            assert side["MagneticFieldStrength"] == 7.0
            assert np.allclose(side["B0Direction"], b0, atol=1e-5)
            sources = side["Sources"]
            assert len(sources) == 2 * 2 * sim.gre.n_echoes  # images and sidecars
            assert f"bids:raw:{folder}/{name}_echo-4_part-phase_MEGRE.nii" in sources
            assert set(side["QSMParameters"]) == set(generated["Parameters"]["qsm"])
            assert "inversion_method" in side["Methods"]
        chi = nib.load(root / folder / f"{name}_Chimap.nii.gz")
        assert b"susceptibility" in chi.header["descrip"].tobytes()
        chi_side = json.loads((root / folder / f"{name}_Chimap.json").read_text())
        assert chi_side["Units"] == "ppm" and "QSM mask" in chi_side["ReferenceRegion"]
        assert json.loads((root / folder / f"{name}_R2starmap.json").read_text())[
            "Units"] == "1/s"
        assert json.loads((root / folder / f"{name}_desc-brain_mask.json").read_text())[
            "Type"] == "Brain"
        assert b"R2*" in nib.load(root / folder / f"{name}_R2starmap.nii.gz").header[
            "descrip"].tobytes()


def test_derivative_maps_match_the_simulated_truth(
        participant: tuple[Path, subprocess.CompletedProcess[str]], sim: Simulation) -> None:
    out, _ = participant
    base = anat(out, "sub-02_acq-fast_run-1") / "sub-02_acq-fast_run-1_"

    def load(m: str) -> np.ndarray:
        return np.asarray(nib.load(f"{base}{m}.nii.gz").dataobj)

    r2s, t2s, chi = load("R2starmap"), load("T2starmap"), load("Chimap")
    mask = load("desc-brain_mask") > 0
    truth = sim.truth
    dice = 2 * (mask & truth.brain_mask).sum() / (mask.sum() + truth.brain_mask.sum())
    assert dice > 0.85, f"brain mask Dice {dice:.2f} with the true brain"
    for tissue in (Tissue.CSF, Tissue.GM, Tissue.WM, Tissue.PUTAMEN):
        sel = (truth.labels == tissue) & mask
        measured, true = np.median(r2s[sel]), np.median(truth.r2star_per_s[sel])
        assert measured == pytest.approx(true, rel=0.1), tissue.name
        assert np.median(t2s[sel]) == pytest.approx(1 / true, rel=0.1), tissue.name
    medians = {t: np.median(chi[(truth.labels == t) & (chi != 0)])
               for t in (Tissue.WM, Tissue.GM, Tissue.PUTAMEN, Tissue.GLOBUS_PALLIDUS)}
    true_medians = {t: np.median(truth.chi_ppm[truth.labels == t]) for t in medians}
    assert sorted(medians, key=medians.get) == sorted(true_medians, key=true_medians.get)
    contrast = medians[Tissue.GLOBUS_PALLIDUS] - medians[Tissue.WM]
    true_contrast = true_medians[Tissue.GLOBUS_PALLIDUS] - true_medians[Tissue.WM]
    assert contrast == pytest.approx(true_contrast, rel=0.5)


def test_group_level_tabulates_every_acquisition_and_failure(
        participant: tuple[Path, subprocess.CompletedProcess[str]], cohort: Path) -> None:
    out, _ = participant
    done = qsm(cohort, out, "group")
    assert done.returncode == 0, done.stderr
    assert "5 rows, 5 acquisitions, 2 failed" in done.stdout
    assert "no M1 measurements" in done.stdout
    assert "failed: sub-03: " in done.stderr
    lines = (out / "qsmnode/group/cohort.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]
    assert header[:4] == ["subject", "session", "acq", "run"]
    by_name = {r["acquisition"]: r for r in rows}
    assert sorted(by_name) == sorted([*GOOD, *BAD])
    assert by_name["sub-02_acq-fast_run-1"]["acq"] == "fast"
    assert by_name["sub-02_acq-fast_run-1"]["run"] == "1"
    assert by_name["sub-01_ses-2"]["session"] == "2"
    assert all(by_name[n]["status"] == "done" for n in GOOD)
    assert by_name["sub-04"]["status"] == "failed"
    assert "echo 3 has no part-phase file" in by_name["sub-04"]["error"]
    assert 0.1 < float(by_name["sub-01_ses-1"]["mask_fraction"]) < 0.6
    columns = json.loads((out / "qsmnode/group/cohort.json").read_text())
    assert set(columns) == set(header)
    one = qsm(cohort, out, "group", "--participant-label", "02")
    assert one.returncode == 0, one.stderr
    assert "(1 rows, 1 acquisitions, 0 failed)" in one.stdout


def test_a_rerun_skips_finished_work_and_redoes_changed_inputs(
        participant: tuple[Path, subprocess.CompletedProcess[str]], cohort: Path) -> None:
    out, _ = participant
    chi = {n: anat(out, n) / f"{n}_Chimap.nii.gz" for n in GOOD}
    before = {n: p.stat().st_mtime_ns for n, p in chi.items()}
    again = qsm(cohort, out, "participant", "--participant-label", "01", "02")
    assert again.returncode == 0, again.stderr
    assert "0 done, 3 skipped (finished before), 0 failed" in again.stdout
    assert {n: p.stat().st_mtime_ns for n, p in chi.items()} == before
    # an input changed: only that acquisition is processed again
    echo = cohort / "sub-01/ses-2/anat/sub-01_ses-2_echo-1_part-mag_MEGRE.json"
    os.utime(echo, ns=(echo.stat().st_atime_ns, echo.stat().st_mtime_ns + 10**9))
    third = qsm(cohort, out, "participant", "--participant-label", "01", "02",
                "--n-workers", "1")
    assert third.returncode == 0, third.stderr
    assert "1 done, 2 skipped (finished before), 0 failed" in third.stdout
    assert chi["sub-01_ses-2"].stat().st_mtime_ns != before["sub-01_ses-2"]
    assert chi["sub-01_ses-1"].stat().st_mtime_ns == before["sub-01_ses-1"]


def test_participant_label_selects(cohort: Path, tmp_path: Path) -> None:
    done = qsm(cohort, tmp_path, "participant", "--participant-label", "sub-02",
               "--n-workers", "1")
    assert done.returncode == 0, done.stderr
    assert "1 MEGRE acquisition(s) of 1 subject(s)" in done.stdout
    subjects = sorted(p.name for p in (tmp_path / "qsmnode").glob("sub-*"))
    assert subjects == ["sub-02"]
    assert (tmp_path / "qsmnode/sub-02/anat/sub-02_acq-fast_run-1_Chimap.nii.gz").is_file()


def test_m1_writes_a_dseg_with_labels_and_measurements_and_the_group_figures(
        cohort: Path, tmp_path: Path) -> None:
    from PIL import Image

    from qsmnode.m1.result import AREAS, LAYERS

    norms = REPO / "config" / "m1_normative.example.toml"
    done = qsm(cohort, tmp_path, "participant", "--participant-label", "02", "--m1",
               "--normative", norms, "--n-workers", "1")
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "qsmnode/sub-02/anat"
    name = "sub-02_acq-fast_run-1"
    dseg = np.asarray(nib.load(folder / f"{name}_desc-m1_dseg.nii.gz").dataobj)
    assert dseg.dtype == np.uint8 and set(np.unique(dseg)) <= set(range(13))
    lines = (folder / f"{name}_desc-m1_dseg.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["index", "name", "area", "layer"]
    labels = {int(line.split("\t")[0]): line.split("\t")[1] for line in lines[1:]}
    assert len(labels) == len(AREAS) * len(LAYERS)
    assert labels[1] == f"{AREAS[0]}_{LAYERS[0]}"
    table = (folder / f"{name}_desc-m1_measurements.tsv").read_text().splitlines()
    header = table[0].split("\t")
    rows = [dict(zip(header, line.split("\t"), strict=True)) for line in table[1:]]
    assert {"area", "layer", "chi_mean_ppm", "thickness_mean_mm", "qc_area_covered",
            "qc_measures_reliable"} <= set(header)
    assert {(r["area"], r["layer"]) for r in rows} == {
        (a, layer) for a in AREAS for layer in (*LAYERS, "all")}
    # the measurements describe the labelled voxels of the dseg written beside them
    by_label = {v: k for k, v in labels.items()}
    for r in rows:
        if r["layer"] != "all":
            count = int((dseg == by_label[f"{r['area']}_{r['layer']}"]).sum())
            assert int(r["voxel_count"]) == count, r
    side = json.loads((folder / f"{name}_desc-m1_measurements.json").read_text())
    assert side["chi_mean_ppm"]["Units"] == "ppm"
    assert any(f["name"] == "registration_nmi" for f in side["QualityFlags"])

    group = qsm(cohort, tmp_path, "group")
    assert group.returncode == 0, group.stderr
    cohort_rows = (tmp_path / "qsmnode/group/cohort.tsv").read_text().splitlines()
    assert len(cohort_rows) == 1 + len(rows)
    assert "qc_failed" in cohort_rows[0] and "chi_mean_ppm" in cohort_rows[0]
    for png in ("deep_chi_per_area.png", "thickness_per_area.png"):
        assert f"figure: {tmp_path / 'qsmnode/group' / png}" in group.stdout
        with Image.open(tmp_path / "qsmnode/group" / png) as image:
            assert image.format == "PNG" and image.size == (700, 400)
