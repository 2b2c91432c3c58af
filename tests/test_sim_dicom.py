"""The simulator's DICOM writer against independent readers: dcm2niix, dciodvfy and pydicom."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.valuerep import format_number_as_ds

from qsmnode.acquisition import MultiEchoGRE
from qsmnode.dicom.geometry import (
    affine_from_slices,
    plane_geometry,
    slice_pixels,
    volume_from_frames,
)
from qsmnode.sim.scanner import ScanParams, Simulation, simulate
from qsmnode.sim.truth import write_truth
from qsmnode.sim.vendor_dicom import (
    PHILIPS_PHASE_SLOPE,
    STYLES,
    SimStudyInfo,
    encode_phase_philips,
    encode_phase_siemens,
    magnitude_scale,
    write_dicom,
    write_t1w_dicom,
)
from tests.conftest import require_tool

SHAPE = (24, 20, 12)
ECHO_TIMES_S = (0.004, 0.009, 0.014, 0.019)
SIEMENS_STEP_RAD = 2 * np.pi / 4096
PHILIPS_STEP_RAD = PHILIPS_PHASE_SLOPE / 1000


def _rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    a, b = [ax for ax in range(3) if ax != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def oblique_affine(voxel_mm: tuple[float, float, float] = (0.9, 1.1, 1.6)) -> np.ndarray:
    """18° about x, then 7° about y, anisotropic voxels, an off-centre origin."""
    affine = np.eye(4)
    affine[:3, :3] = _rotation(0, 18) @ _rotation(1, 7) @ np.diag(voxel_mm)
    affine[:3, 3] = (-10.3, -12.7, 5.1)
    return affine


def synthetic_gre() -> MultiEchoGRE:
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in SHAPE), indexing="ij")
    base = 100 + 50 * np.sin(i / 5) + 30 * np.cos(j / 4) + 2 * k
    magnitude = np.stack([base * np.exp(-te / 0.03) for te in ECHO_TIMES_S], axis=-1)
    ramp = 0.9 * i + 0.55 * j + 0.35 * k
    phase = np.stack([np.angle(np.exp(1j * ramp * (e + 1))) for e in range(4)], axis=-1)
    phase[phase >= np.pi] = -np.pi
    phase[0, 0, 0, 0] = -np.pi  # both ends of the range
    phase[1, 0, 0, 0] = np.nextafter(np.float32(np.pi), np.float32(0))
    return MultiEchoGRE(
        magnitude=magnitude.astype(np.float32),
        phase=phase.astype(np.float32),
        echo_times_s=ECHO_TIMES_S,
        affine=oblique_affine(),
        field_strength_t=7.0,
    )


@pytest.fixture(scope="module")
def gre() -> MultiEchoGRE:
    return synthetic_gre()


@pytest.fixture(scope="module")
def written(gre: MultiEchoGRE, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every style written once, same seed (one study): style -> (out_dir, files)."""
    root = tmp_path_factory.mktemp("sim_dicom")
    return {s: (root / s, write_dicom(gre, root / s, s, SimStudyInfo(seed=7))) for s in STYLES}


def _angle_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(np.angle(np.exp(1j * (np.asarray(a, np.float64) - b))))


def _as_ds(values) -> list[float]:
    """What survives a trip through a DS string."""
    return [float(format_number_as_ds(float(v))) for v in values]


# ---------------------------------------------------------------------------------------------
# geometry


def test_geometry_round_trip_is_exact() -> None:
    affine = oblique_affine()
    geo = plane_geometry(affine, SHAPE[2])
    shuffled = np.random.default_rng(0).permutation(SHAPE[2])
    back, order = affine_from_slices(
        [_as_ds(geo.orientation)] * SHAPE[2],
        [_as_ds(geo.positions[k]) for k in shuffled],
        _as_ds(geo.pixel_spacing),
    )
    np.testing.assert_allclose(back, affine, atol=1e-6)
    np.testing.assert_array_equal(shuffled[order], np.arange(SHAPE[2]))
    assert geo.pixel_spacing == pytest.approx((1.1, 0.9))
    assert geo.slice_spacing == pytest.approx(1.6)


def test_geometry_axes_match_dicom_rows_and_columns() -> None:
    """i steps along the IOP row cosine (columns), j along the column cosine (rows), in LPS."""
    affine = np.diag([-0.5, -0.7, 2.0, 1.0])  # i to the patient's left, j posterior: "LPS"
    geo = plane_geometry(affine, 3)
    assert geo.orientation == pytest.approx((1, 0, 0, 0, 1, 0))
    assert geo.pixel_spacing == pytest.approx((0.7, 0.5))
    np.testing.assert_allclose(geo.positions[2], (0, 0, 4))
    volume = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    assert slice_pixels(volume, 1).shape == (3, 2)  # Rows = size of j, Columns = size of i
    assert slice_pixels(volume, 1)[2, 1] == volume[1, 2, 1]
    np.testing.assert_array_equal(
        volume_from_frames([slice_pixels(volume, k) for k in range(4)]), volume
    )


def test_geometry_reversed_slices_sort_along_normal() -> None:
    affine = oblique_affine()
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1, SHAPE[2] - 1
    reversed_affine = affine @ flip  # same voxels, k against the normal
    geo = plane_geometry(reversed_affine, SHAPE[2])
    back, order = affine_from_slices([geo.orientation] * SHAPE[2], geo.positions, geo.pixel_spacing)
    np.testing.assert_allclose(back, affine, atol=1e-9)
    np.testing.assert_array_equal(order, np.arange(SHAPE[2])[::-1])


def test_geometry_rejects_bad_stacks() -> None:
    geo = plane_geometry(oblique_affine(), 4)
    with pytest.raises(ValueError, match="evenly"):
        positions = geo.positions.copy()
        positions[2] += 0.3 * geo.normal
        affine_from_slices([geo.orientation] * 4, positions, geo.pixel_spacing)
    with pytest.raises(ValueError, match="share a position"):
        affine_from_slices([geo.orientation] * 2, geo.positions[[1, 1]], geo.pixel_spacing)
    one, _ = affine_from_slices(
        [geo.orientation], geo.positions[:1], geo.pixel_spacing, slice_spacing=1.6
    )
    np.testing.assert_allclose(one, oblique_affine(), atol=1e-9)
    skew = np.eye(4)
    skew[:3, 1] = (0.3, 1.0, 0.0)
    with pytest.raises(ValueError, match="orthogonal"):
        plane_geometry(skew, 2)


# ---------------------------------------------------------------------------------------------
# encodings


def test_phase_encodings_round_trip_within_one_step(gre: MultiEchoGRE) -> None:
    siemens = encode_phase_siemens(gre.phase)
    assert siemens.min() == 0 and siemens.max() <= 4095
    radians = (siemens.astype(np.float64) * 2 - 4096) * np.pi / 4096
    assert _angle_diff(radians, gre.phase).max() <= SIEMENS_STEP_RAD / 2 + 1e-6
    philips = encode_phase_philips(gre.phase)
    assert philips.max() <= 4095
    radians = (philips * PHILIPS_PHASE_SLOPE - 3142) / 1000
    assert _angle_diff(radians, gre.phase).max() <= PHILIPS_STEP_RAD / 2 + 1e-6


# ---------------------------------------------------------------------------------------------
# the written files read back by pydicom


def test_classic_files_read_back_exactly(gre: MultiEchoGRE, written: dict) -> None:
    """Siemens phase, first echo: pydicom headers give back the affine and the pixels."""
    _, files = written["siemens"]
    datasets = [pydicom.dcmread(f) for f in files]
    phase = [d for d in datasets if "P" in d.ImageType and int(d.EchoNumbers) == 1]
    assert len(phase) == SHAPE[2]
    affine, order = affine_from_slices(
        [d.ImageOrientationPatient for d in phase],
        [d.ImagePositionPatient for d in phase],
        phase[0].PixelSpacing,
    )
    np.testing.assert_allclose(affine, gre.affine, atol=1e-6)
    volume = volume_from_frames([phase[n].pixel_array for n in order])
    np.testing.assert_array_equal(volume, encode_phase_siemens(gre.phase[..., 0]))
    ds = phase[0]
    assert ds.SliceThickness == pytest.approx(1.6) and ds.SpacingBetweenSlices == pytest.approx(1.6)
    assert ds.MagneticFieldStrength == pytest.approx(7.0)
    assert ds.ImagingFrequency == pytest.approx(42.577478 * 7, abs=1e-6)
    assert (ds.RescaleSlope, ds.RescaleIntercept) == (2, -4096)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian


def test_enhanced_frames_read_back_exactly(gre: MultiEchoGRE, written: dict) -> None:
    _, (path,) = written["enhanced"]
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4.1"
    assert int(ds.NumberOfFrames) == 2 * SHAPE[2] * len(ECHO_TIMES_S)
    shared = ds.SharedFunctionalGroupsSequence[0]
    frames = ds.pixel_array
    picked = {}
    for n, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
        component = fg.MRImageFrameTypeSequence[0].ComplexImageComponent
        te = fg.MREchoSequence[0].EffectiveEchoTime
        if component == "PHASE" and te == pytest.approx(ECHO_TIMES_S[2] * 1000):
            picked[n] = fg
    assert len(picked) == SHAPE[2]
    affine, order = affine_from_slices(
        [shared.PlaneOrientationSequence[0].ImageOrientationPatient] * len(picked),
        [fg.PlanePositionSequence[0].ImagePositionPatient for fg in picked.values()],
        shared.PixelMeasuresSequence[0].PixelSpacing,
    )
    np.testing.assert_allclose(affine, gre.affine, atol=1e-6)
    frame_numbers = list(picked)
    pvt = picked[frame_numbers[0]].PixelValueTransformationSequence[0]
    volume = volume_from_frames([frames[frame_numbers[n]] for n in order])
    radians = (volume * float(pvt.RescaleSlope) + float(pvt.RescaleIntercept)) / 1000
    assert _angle_diff(radians, gre.phase[..., 2]).max() <= PHILIPS_STEP_RAD


def test_style_tags(written: dict) -> None:
    for style, (_, files) in written.items():
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert ds.Modality == "MR" and ds.BodyPartExamined == "HEAD"
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        if style == "siemens-xa":
            assert "EchoNumbers" not in ds
        elif style != "enhanced":
            assert int(ds.EchoNumbers) == 1 and float(ds.EchoTime) == pytest.approx(4.0)
        if style == "philips":
            assert ds[0x2005, 0x0010].value == "Philips MR Imaging DD 001"
            assert ds[0x2005, 0x1011].value == "M"
            last = pydicom.dcmread(files[-1], stop_before_pixels=True)
            assert last[0x2005, 0x1011].value == "P" and last.RescaleType == "mrad"
    series = {
        pydicom.dcmread(f, stop_before_pixels=True).SeriesNumber for f in written["siemens-xa"][1]
    }
    assert len(series) == 2 * len(ECHO_TIMES_S)


# ---------------------------------------------------------------------------------------------
# dcm2niix reads the same voxels at the same places


def _dcm2niix(in_dir: Path, out_dir: Path) -> list[Path]:
    exe = require_tool("dcm2niix", "dcm2niix")
    out_dir.mkdir()
    run = subprocess.run(
        [exe, "-b", "y", "-z", "n", "-f", "%s_%e_%p", "-o", str(out_dir), str(in_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return sorted(out_dir.glob("*.nii"))


def _ours_in_their_order(
    values: np.ndarray, ours: np.ndarray, theirs: np.ndarray, shape: tuple[int, ...]
) -> np.ndarray:
    """Resample ``values`` (on our grid) at the voxels of their grid, via both affines."""
    mapping = np.linalg.inv(ours) @ theirs
    integer = np.rint(mapping)
    assert np.abs(theirs - ours @ integer).max() < 1e-3, "grids differ by more than 1e-3 mm"
    rot = integer[:3, :3]
    assert np.array_equal(np.abs(rot).sum(axis=0), np.ones(3)), "not a voxel permutation"
    grid = np.indices(shape).reshape(3, -1)
    idx = (rot @ grid + integer[:3, 3:4]).astype(int)
    for axis in range(3):
        assert idx[axis].min() >= 0 and idx[axis].max() < values.shape[axis]
    return values[idx[0], idx[1], idx[2]].reshape(shape)


@pytest.mark.parametrize("style", STYLES)
def test_dcm2niix_reads_geometry_and_values(
    style: str, gre: MultiEchoGRE, written: dict, tmp_path: Path
) -> None:
    out_dir, _ = written[style]
    niftis = _dcm2niix(out_dir, tmp_path / "nii")
    seen = set()
    scale = magnitude_scale(gre)
    for nii in niftis:
        meta = json.loads(nii.with_suffix(".json").read_text())
        is_phase = "P" in meta["ImageType"] or "PHASE" in meta["ImageType"]
        echo = int(np.argmin([abs(te - meta["EchoTime"]) for te in ECHO_TIMES_S]))
        assert abs(ECHO_TIMES_S[echo] - meta["EchoTime"]) < 1e-6
        seen.add((is_phase, echo))
        image = nib.load(nii)
        data = np.asarray(image.get_fdata(), dtype=np.float64).reshape(image.shape[:3])
        if is_phase:
            expected = _ours_in_their_order(
                gre.phase[..., echo], gre.affine, image.affine, data.shape
            )
            if style.startswith("siemens"):  # dcm2niix keeps slope 2, intercept -4096
                radians, step = data * np.pi / 4096, SIEMENS_STEP_RAD
            else:  # Philips: dcm2niix keeps the mrad of RescaleSlope/Intercept
                radians, step = data / 1000, PHILIPS_STEP_RAD
            worst = _angle_diff(radians, expected).max()
            assert worst <= step, f"{nii.name}: phase off by {worst} rad"
        else:
            expected = _ours_in_their_order(
                gre.magnitude[..., echo], gre.affine, image.affine, data.shape
            )
            if style.startswith("siemens"):  # no rescale: stored = magnitude * scale
                expected, tol = expected * scale, 0.5 + 1e-3
            else:
                tol = 0.5 / scale * (1 + 1e-4)
            worst = np.abs(data - expected).max()
            assert worst <= tol, f"{nii.name}: magnitude off by {worst}"
    assert seen == {(p, e) for p in (False, True) for e in range(len(ECHO_TIMES_S))}


# ---------------------------------------------------------------------------------------------
# dciodvfy


@pytest.mark.parametrize("style", STYLES)
def test_dciodvfy_reports_no_errors(style: str, written: dict) -> None:
    exe = require_tool("dciodvfy", "dicom3tools")
    _, files = written[style]

    def errors(path: Path) -> list[str]:
        run = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
        lines = (run.stdout + run.stderr).splitlines()
        return [f"{path.name}: {line}" for line in lines if "Error" in line]

    with ThreadPoolExecutor(max_workers=8) as pool:
        found = [line for lines in pool.map(errors, files) for line in lines]
    assert not found, "\n".join(found[:40])


# ---------------------------------------------------------------------------------------------
# identity: UIDs and patient


def _uids(files: list[Path]) -> list[tuple[str, str, str, str]]:
    out = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out.append(
            (ds.StudyInstanceUID, ds.FrameOfReferenceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        )
    return out


def test_uids_depend_only_on_seed(gre: MultiEchoGRE, tmp_path: Path) -> None:
    small = MultiEchoGRE(
        gre.magnitude[:6, :5, :3, :2], gre.phase[:6, :5, :3, :2], ECHO_TIMES_S[:2], gre.affine, 7.0
    )
    first = _uids(write_dicom(small, tmp_path / "a", "siemens", SimStudyInfo(seed=3)))
    again = _uids(write_dicom(small, tmp_path / "b", "siemens", SimStudyInfo(seed=3)))
    other = _uids(write_dicom(small, tmp_path / "c", "siemens", SimStudyInfo(seed=4)))
    assert first == again
    assert len({u[3] for u in first}) == len(first)
    for a, b in zip(first, other, strict=True):
        assert not set(a) & set(b)
    for uid in (u for row in first for u in row):
        assert len(uid) <= 64 and pydicom.uid.UID(uid).is_valid


def test_one_synthetic_patient_study_and_frame_of_reference(written: dict) -> None:
    files = [f for _, fs in written.values() for f in fs]
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert {str(d.PatientName) for d in datasets} == {"SIM^PHANTOM"}
    assert {d.PatientID for d in datasets} == {"QSMNODE-SIM-0001"}
    assert len({d.StudyInstanceUID for d in datasets}) == 1
    assert len({d.FrameOfReferenceUID for d in datasets}) == 1
    assert len({d.SOPInstanceUID for d in datasets}) == len(datasets)
    series_per_style = {
        style: {pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in fs}
        for style, (_, fs) in written.items()
    }
    assert sum(map(len, series_per_style.values())) == len(set().union(*series_per_style.values()))


# ---------------------------------------------------------------------------------------------
# the simulator's own oblique slab, against its written truth


@pytest.fixture(scope="module")
def simulated_slab() -> Simulation:
    """A small oblique slab of the phantom with anisotropic voxels."""
    return simulate(ScanParams(
        shape=(48, 40, 14), voxel_size_mm=(0.8, 0.9, 1.4), centre_mm=(0.0, -20.0, 55.0),
        rotation_deg=(18.0, 7.0, 0.0), coarse_mm=4.0, seed=2,
    ))


@pytest.mark.parametrize("style", ["siemens", "philips", "enhanced"])
def test_dcm2niix_matches_the_simulated_truth(
    style: str, simulated_slab: Simulation, tmp_path: Path
) -> None:
    sim, scan = simulated_slab, simulated_slab.scan
    write_dicom(sim.gre, tmp_path / "dicom", style, SimStudyInfo(seed=2))
    truth_affine = nib.load(write_truth(sim, tmp_path / "truth")[0]).affine
    assert np.allclose(truth_affine, sim.gre.affine)
    niftis = _dcm2niix(tmp_path / "dicom", tmp_path / "nii")
    def is_phase(nii: Path) -> bool:
        image_type = json.loads(nii.with_suffix(".json").read_text())["ImageType"]
        return "P" in image_type or "PHASE" in image_type

    phases = [n for n in niftis if is_phase(n)]
    assert len(phases) == len(scan.echo_times_s)
    for nii in phases:
        meta = json.loads(nii.with_suffix(".json").read_text())
        echo = int(np.argmin([abs(te - meta["EchoTime"]) for te in scan.echo_times_s]))
        image = nib.load(nii)
        data = np.asarray(image.get_fdata(), dtype=np.float64).reshape(image.shape[:3])
        # Checks the two affines agree within 1e-3 mm while mapping the voxels.
        expected = _ours_in_their_order(sim.gre.phase[..., echo], truth_affine, image.affine,
                                        data.shape)
        if style == "siemens":
            radians, step = data * np.pi / 4096, SIEMENS_STEP_RAD
        else:
            radians, step = data / 1000, PHILIPS_STEP_RAD
        assert _angle_diff(radians, expected).max() <= step


# ---------------------------------------------------------------------------------------------
# the same-session T1w series


def test_t1w_series_is_valid_and_dcm2niix_reads_its_geometry(tmp_path: Path) -> None:
    """An oblique sagittal-ish T1w: dciodvfy finds no error, dcm2niix the same voxels."""
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    shape = (18, 22, 16)
    affine = np.eye(4)
    affine[:3, :3] = _rotation(2, 90) @ _rotation(0, 8) @ np.diag((1.0, 1.1, 1.2))
    affine[:3, 3] = (-4.0, 20.0, 30.0)
    image = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) % 997
    files = write_t1w_dicom(image, affine, tmp_path / "in", SimStudyInfo(seed=7))
    assert len(files) == shape[2]
    for path in (files[0], files[-1]):
        run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=120)
        errors = [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]
        assert not errors, "\n".join(errors)
    [nii] = _dcm2niix(tmp_path / "in", tmp_path / "nii")
    loaded = nib.load(nii)
    data = np.asarray(loaded.get_fdata()).reshape(loaded.shape[:3])
    expected = _ours_in_their_order(image, affine, loaded.affine, data.shape)
    scale = 4095 / float(image.max())
    assert np.abs(data - expected * scale).max() <= 0.5 + 1e-3
    meta = json.loads(nii.with_suffix(".json").read_text())
    assert meta["InversionTime"] == pytest.approx(1.05) and meta["SeriesNumber"] == 2
