"""DICOM files into acquisitions: summaries, grouping, problems and loading, on simulated files of
every vendor style and on the real Philips and Siemens samples."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from qsmnode.acquisition import MultiEchoGRE
from qsmnode.dicom.headers import HeaderError, Part, Vendor, summarize, vendor_of
from qsmnode.dicom.load import (
    AcquisitionPlan,
    LoadedAcquisition,
    PassedOver,
    Problem,
    group_acquisitions,
    load_acquisition,
    load_folder,
    phase_scaling_from_range,
    summarize_files,
    wrap_phase,
)
from qsmnode.sim.scanner import Simulation, preset, simulate
from qsmnode.sim.vendor_dicom import (
    STYLES,
    SimStudyInfo,
    magnitude_scale,
    write_dicom,
)
from tests.dicomutil import PHASE_STEP, angle_error, voxel_map


@pytest.fixture(scope="module")
def sim() -> Simulation:
    """The tiny preset's field of view on a coarse grid (12 slices, 3 echoes): fast."""
    scan = preset(
        "tiny",
        shape=(24, 28, 12),
        voxel_size_mm=(7.0, 7.0, 12.0),
        echo_times_s=(0.005, 0.0105, 0.016),
    )
    return simulate(scan)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _only(results: list) -> LoadedAcquisition:
    problems = [r.reason for r in results if isinstance(r, Problem)]
    assert not problems, problems
    assert len(results) == 1, results
    assert isinstance(results[0], LoadedAcquisition)
    return results[0]


def _only_problem(results: list) -> str:
    assert len(results) == 1, results
    assert isinstance(results[0], Problem), results[0]
    assert not isinstance(results[0], PassedOver), results[0]
    return results[0].reason


def _only_passed_over(results: list) -> str:
    """The one result, passed over (not a problem): its reason."""
    assert len(results) == 1, results
    assert isinstance(results[0], PassedOver), results[0]
    assert results[0].reason.endswith(results[0].why)
    return results[0].reason


def _plan(folder: Path, **kwargs: object) -> AcquisitionPlan | Problem:
    results = group_acquisitions(summarize_files(_files(folder)), **kwargs)  # type: ignore[arg-type]
    assert len(results) == 1, results
    return results[0]


# ---------------------------------------------------------------------------------------------
# simulated files, every style


@pytest.mark.parametrize("style", STYLES)
def test_every_simulated_style_loads_as_the_truth(style: str, sim: Simulation, tmp_path: Path):
    truth = sim.gre
    written = write_dicom(truth, tmp_path, style)
    loaded = _only(load_folder(tmp_path))
    gre = loaded.gre

    assert gre.echo_times_s == pytest.approx(truth.echo_times_s, abs=1e-9)
    assert gre.field_strength_t == pytest.approx(7.0)
    assert gre.shape == truth.shape
    ia, ib = voxel_map(gre.affine, truth.affine, truth.shape)  # k may be reversed
    for e in range(truth.n_echoes):
        got_phase = gre.phase[..., e][ia].reshape(truth.shape)
        want_phase = truth.phase[..., e][ib].reshape(truth.shape)
        assert angle_error(got_phase, want_phase) <= PHASE_STEP[style] * 0.5 + 1e-5
        got_mag = gre.magnitude[..., e][ia].reshape(truth.shape)
        want_mag = truth.magnitude[..., e][ib].reshape(truth.shape)
        scale = magnitude_scale(truth)
        if style.startswith("siemens"):  # no rescale tags: stored units
            np.testing.assert_allclose(got_mag, want_mag * scale, atol=0.5 + 1e-3)
        else:
            np.testing.assert_allclose(got_mag, want_mag, atol=(0.5 + 1e-3) / scale, rtol=1e-5)
    assert gre.phase.min() >= -np.pi and gre.phase.max() < np.pi
    assert gre.magnitude.dtype == np.float32 and gre.phase.dtype == np.float32

    nk, ne = truth.shape[2], truth.n_echoes
    sources = [s for table in (loaded.magnitude_sources, loaded.phase_sources) for s in table]
    assert loaded.phase_sources is not None
    assert len(loaded.magnitude_sources) == nk and len(loaded.phase_sources) == nk
    flat = [ref for row in sources for ref in row]
    assert all(len(row) == ne for row in sources)
    assert len(set(flat)) == 2 * nk * ne  # complete and unique
    written_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in written}
    assert {ref.sop_instance_uid for ref in flat} == written_uids
    if style == "enhanced":
        assert {ref.frame_number for ref in flat} == set(range(1, 2 * nk * ne + 1))
    else:
        assert all(ref.frame_number is None for ref in flat)
    study = SimStudyInfo()
    assert loaded.study_uid == study.study_instance_uid
    assert loaded.frame_of_reference_uid == study.frame_of_reference_uid
    assert loaded.patient_study["PatientID"] == study.patient_id
    assert "PixelData" not in loaded.header
    assert loaded.vendor == ("siemens" if style.startswith("siemens") else "philips")


def test_two_studies_in_one_folder_are_two_acquisitions(sim: Simulation, tmp_path: Path):
    write_dicom(sim.gre, tmp_path / "a", "siemens", SimStudyInfo(seed=1))
    write_dicom(sim.gre, tmp_path / "b", "philips", SimStudyInfo(seed=2))
    results = load_folder(tmp_path)
    assert len(results) == 2 and all(isinstance(r, LoadedAcquisition) for r in results)
    assert {r.study_uid for r in results} == {  # type: ignore[union-attr]
        SimStudyInfo(seed=1).study_instance_uid,
        SimStudyInfo(seed=2).study_instance_uid,
    }


def test_a_repeated_protocol_in_one_study_is_two_acquisitions(sim: Simulation, tmp_path: Path):
    write_dicom(sim.gre, tmp_path, "siemens", SimStudyInfo(series_number=5))
    write_dicom(sim.gre, tmp_path, "siemens", SimStudyInfo(series_number=7))
    plans = group_acquisitions(summarize_files(_files(tmp_path)))
    assert [p.series_numbers for p in plans] == [(5, 6), (7, 8)]  # type: ignore[union-attr]


def test_echo_identity_is_the_echo_time_not_the_instance_number(sim: Simulation, tmp_path: Path):
    write_dicom(sim.gre, tmp_path, "siemens")
    for path in _files(tmp_path):
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = 1
        ds.save_as(path)
    plan = _plan(tmp_path)
    assert isinstance(plan, AcquisitionPlan) and plan.n_echoes == sim.gre.n_echoes


# ---------------------------------------------------------------------------------------------
# phase scaling, signs and vendors


def _rewrite(paths: list[Path], **changes: object) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in changes.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path)


def test_siemens_phase_without_rescale_tags(sim: Simulation, tmp_path: Path):
    write_dicom(sim.gre, tmp_path / "with", "siemens")
    shutil.copytree(tmp_path / "with", tmp_path / "without")
    phase_files = _files(next((tmp_path / "without").glob("*_P")))
    _rewrite(phase_files, RescaleSlope=None, RescaleIntercept=None, RescaleType=None)
    with_tags = _only(load_folder(tmp_path / "with"))
    without = _only(load_folder(tmp_path / "without"))
    assert "no rescale" in without.phase_scaling
    assert angle_error(without.gre.phase, with_tags.gre.phase) < 1e-5


def test_ge_phase_is_negated_and_scaled_by_its_range(sim: Simulation, tmp_path: Path):
    write_dicom(sim.gre, tmp_path / "siemens", "siemens")
    shutil.copytree(tmp_path / "siemens", tmp_path / "ge")
    _rewrite(_files(tmp_path / "ge"), Manufacturer="GE MEDICAL SYSTEMS")
    reference = _only(load_folder(tmp_path / "siemens"))
    ge = _only(load_folder(tmp_path / "ge"))
    assert ge.vendor == "ge" and ge.phase_sign == -1
    assert "±4096" in ge.phase_scaling  # the generic rule, from the value range
    assert angle_error(ge.gre.phase, -reference.gre.phase) < 1e-5
    overridden = _only(load_folder(tmp_path / "ge", phase_sign={"ge": 1}))
    assert angle_error(overridden.gre.phase, reference.gre.phase) < 1e-5


def test_phase_units_from_the_value_range():
    assert phase_scaling_from_range(-3.14, 3.1)[:2] == (1.0, 0.0)
    assert phase_scaling_from_range(-3142, 3142)[:2] == (1e-3, 0.0)
    a, b, _ = phase_scaling_from_range(0, 4095)
    assert a * 0 + b == pytest.approx(-math.pi) and a * 4096 + b == pytest.approx(math.pi)
    a, b, _ = phase_scaling_from_range(-4096, 4094)
    assert a * -4096 + b == pytest.approx(-math.pi)
    with pytest.raises(ValueError, match="cannot tell the phase units"):
        phase_scaling_from_range(-40000, 40000)
    wrapped = wrap_phase(np.array([np.pi, -np.pi, 3.142, 7.0, -3.2], dtype=np.float32))
    assert wrapped.min() >= -np.pi and wrapped.max() < np.pi
    assert wrapped[0] == wrapped[1] == np.float32(-np.pi)


def test_vendor_from_manufacturer_and_enhanced_from_the_sop_class(sim: Simulation, tmp_path):
    assert vendor_of("SIEMENS") == Vendor.SIEMENS == "siemens"
    assert vendor_of("Siemens Healthineers") == "siemens"
    assert vendor_of("Philips Medical Systems") == "philips"
    assert vendor_of("GE MEDICAL SYSTEMS") == "ge"
    assert vendor_of("Canon Medical Systems") == "other"
    path = write_dicom(sim.gre, tmp_path, "siemens")[0]
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ds.NumberOfFrames = 1
    info = summarize(ds)
    assert not info.enhanced and info.path == str(path)
    assert info.frames[0].part is Part.MAGNITUDE and info.frames[0].echo_number == 1


def test_an_undecodable_header_is_a_header_error_naming_the_element(sim: Simulation, tmp_path):
    path = write_dicom(sim.gre, tmp_path, "siemens")[0]
    data = bytearray(path.read_bytes())
    at = data.index(b"\x20\x00\x37\x00DS")  # (0020,0037) Image Orientation (Patient)
    data[at + 4:at + 6] = b"ZZ"
    path.write_bytes(bytes(data))
    with pytest.raises(HeaderError, match=r"Representation 'ZZ' in tag \(0020,0037\)"):
        summarize(path)


# ---------------------------------------------------------------------------------------------
# problems


def test_a_missing_phase_slice_is_reported_with_counts(sim: Simulation, tmp_path: Path):
    write_dicom(sim.gre, tmp_path, "siemens")
    phase_dir = next(tmp_path.glob("*_P"))
    nk = sim.gre.shape[2]
    (phase_dir / f"{nk + 3:05d}.dcm").unlink()  # echo 2, slice 3
    reason = _only_problem(group_acquisitions(summarize_files(_files(tmp_path))))
    assert "a phase slice is missing" in reason
    assert f"phase echo 2 (TE 10.5 ms, series 6) has {nk - 1} of {nk} slices" in reason
    assert "series 5, 6" in reason


def test_phase_one_slice_short_of_magnitude(sim: Simulation, tmp_path: Path):
    write_dicom(sim.gre, tmp_path, "siemens")
    phase_dir = next(tmp_path.glob("*_P"))
    nk = sim.gre.shape[2]
    for e in range(sim.gre.n_echoes):  # the last slice of every echo
        (phase_dir / f"{(e + 1) * nk:05d}.dcm").unlink()
    reason = _only_problem(group_acquisitions(summarize_files(_files(tmp_path))))
    assert reason.count(f"has {nk - 1} of {nk} slices") == sim.gre.n_echoes
    assert "phase is one slice short of magnitude" in reason


def test_mismatched_echo_times_between_magnitude_and_phase(sim: Simulation, tmp_path: Path):
    write_dicom(sim.gre, tmp_path, "siemens-xa")
    ne = sim.gre.n_echoes
    phase_echo2 = next(tmp_path.glob(f"{5 + ne + 1:04d}_*_P_e2"))
    _rewrite(_files(phase_echo2), EchoTime="11")
    reason = _only_problem(group_acquisitions(summarize_files(_files(tmp_path))))
    assert "mismatched echo times" in reason
    assert "TE 10.5 ms with no matching phase" in reason
    assert "TE 11 ms with no matching magnitude" in reason


def test_a_single_echo_is_not_enough(sim: Simulation, tmp_path: Path):
    one = replace(
        sim.gre,
        magnitude=sim.gre.magnitude[..., :1],
        phase=sim.gre.phase[..., :1],
        echo_times_s=sim.gre.echo_times_s[:1],
    )
    write_dicom(one, tmp_path, "philips")
    reason = _only_problem(group_acquisitions(summarize_files(_files(tmp_path))))
    assert "1 echo, the rule needs at least 2" in reason
    plan = _plan(tmp_path, min_echoes=1)
    assert isinstance(plan, AcquisitionPlan)
    assert load_acquisition(plan).gre.n_echoes == 1


def test_no_phase(sim: Simulation, tmp_path: Path):
    write_dicom(sim.gre, tmp_path, "siemens")
    shutil.rmtree(next(tmp_path.glob("*_P")))
    reason = _only_problem(group_acquisitions(summarize_files(_files(tmp_path))))
    assert "no phase" in reason and "series 5 " in reason
    plan = _plan(tmp_path, require_phase=False)
    assert isinstance(plan, AcquisitionPlan) and plan.phase is None
    loaded = load_acquisition(plan)
    assert not loaded.has_phase and np.isnan(loaded.gre.phase).all()


def test_a_phase_difference_field_map_is_refused(sim: Simulation, tmp_path: Path):
    """Passed over by default (not a QSM candidate); a problem when the rules ask for QSM on
    that series (its description among rules.qsm_series, or pass_over off)."""
    write_dicom(sim.gre, tmp_path, "siemens")
    _rewrite(_files(next(tmp_path.glob("*_P"))), SequenceName="*fm2d2r")
    infos = summarize_files(_files(tmp_path))
    reason = _only_passed_over(group_acquisitions(infos))
    assert "phase-difference field map" in reason and "*fm2d2r" in reason
    description = infos[0].series_description
    for rules in ({"pass_over": False}, {"qsm_series": (description.upper()[:4] + "*",)}):
        reason = _only_problem(group_acquisitions(infos, **rules))  # type: ignore[arg-type]
        assert "phase-difference field map" in reason and "*fm2d2r" in reason


def test_siemens_field_map_pattern_two_magnitudes_one_phase(sim: Simulation, tmp_path: Path):
    two = replace(
        sim.gre,
        magnitude=sim.gre.magnitude[..., :2],
        phase=sim.gre.phase[..., :2],
        echo_times_s=sim.gre.echo_times_s[:2],
    )
    write_dicom(two, tmp_path, "siemens")
    nk = sim.gre.shape[2]
    for k in range(nk):  # drop the phase of echo 1: phase only at TE2, like gre_field_mapping
        (next(tmp_path.glob("*_P")) / f"{k + 1:05d}.dcm").unlink()
    infos = summarize_files(_files(tmp_path))
    assert "phase-difference field map" in _only_passed_over(group_acquisitions(infos))
    reason = _only_problem(group_acquisitions(infos, pass_over=False))
    assert "phase-difference field map" in reason


def test_mixed_geometry_is_reported(sim: Simulation, tmp_path: Path):
    write_dicom(sim.gre, tmp_path, "siemens")
    _rewrite(_files(next(tmp_path.glob("*_P"))), PixelSpacing=["6.5", "6.5"])
    reason = _only_problem(group_acquisitions(summarize_files(_files(tmp_path))))
    assert "mixed geometry" in reason and "pixel spacing" in reason


def test_echoes_sharing_one_echo_time_are_reported(sim: Simulation, tmp_path: Path):
    write_dicom(sim.gre, tmp_path, "siemens")
    _rewrite(_files(tmp_path), EchoTime="5")  # GE-style: the first TE on every echo
    reason = _only_problem(group_acquisitions(summarize_files(_files(tmp_path))))
    assert "different echo numbers" in reason


# ---------------------------------------------------------------------------------------------
# real scanner files


@pytest.fixture(scope="module")
def philips_classic(shared_data: Path) -> LoadedAcquisition:
    return _only(load_folder(shared_data / "philips-3t-2echo" / "classic"))


def test_real_philips_classic(philips_classic: LoadedAcquisition):
    gre = philips_classic.gre
    assert gre.echo_times_s == pytest.approx((0.0023, 0.0046))
    assert gre.shape == (80, 80, 53)
    assert gre.field_strength_t == 3.0
    assert philips_classic.vendor == "philips"
    assert gre.voxel_size_mm == pytest.approx([3, 3, 3], abs=1e-3)
    assert "mrad" in philips_classic.phase_scaling
    assert gre.phase.min() >= -np.pi and gre.phase.max() < np.pi
    assert gre.phase.max() - gre.phase.min() > 6.2  # wrapped phase fills the range
    uids = {r.sop_instance_uid for row in philips_classic.magnitude_sources for r in row}
    uids |= {r.sop_instance_uid for row in philips_classic.phase_sources or () for r in row}
    assert len(uids) == 212


def test_real_philips_enhanced_equals_classic(shared_data: Path, philips_classic):
    enhanced = _only(load_folder(shared_data / "philips-3t-2echo" / "enhanced"))
    assert enhanced.gre.echo_times_s == philips_classic.gre.echo_times_s
    np.testing.assert_allclose(enhanced.gre.affine, philips_classic.gre.affine, atol=1e-6)
    np.testing.assert_array_equal(enhanced.gre.magnitude, philips_classic.gre.magnitude)
    np.testing.assert_array_equal(enhanced.gre.phase, philips_classic.gre.phase)
    frames = {r.frame_number for row in enhanced.magnitude_sources for r in row}
    assert len(frames) == 106 and len({r.sop_instance_uid for r in enhanced.magnitude_sources[0]})


def test_real_philips_matches_dcm2niix(shared_data: Path, philips_classic):
    reference = shared_data / "philips-3t-2echo" / "reference"
    gre = philips_classic.gre
    for e in (1, 2):
        for part in ("", "_ph"):
            img = nib.load(reference / f"2001_WIP_fcMRI_Field_Mapping_cl_e{e}{part}.nii.gz")
            ours_idx, ref_idx = voxel_map(gre.affine, img.affine, img.shape)
            ref = np.asarray(img.get_fdata(), dtype=np.float64)[ref_idx]
            if part:  # dcm2niix scales Philips phase to radians itself
                ours = gre.phase[..., e - 1][ours_idx]
                assert angle_error(ours, ref) < 2e-3
            else:  # dcm2niix writes Philips floating-point values (stored / ScaleSlope)
                ours = gre.magnitude[..., e - 1][ours_idx]
                ratio = float(np.median(ours[ref > 0] / ref[ref > 0]))
                assert ratio == pytest.approx(1.29158 * 0.000237989, rel=1e-4)  # RS · SS
                np.testing.assert_allclose(ours, ref * ratio, rtol=1e-5, atol=1e-3)


def test_real_siemens_single_slice(shared_data: Path):
    folder = shared_data / "siemens-3t-megre-1slice"
    loaded = _only(load_folder([folder / "mag", folder / "phase"]))
    gre = loaded.gre
    assert gre.echo_times_s == pytest.approx((0.004, 0.010, 0.016))
    assert gre.shape == (54, 64, 1)
    assert loaded.series_numbers == (2, 3)
    assert "Siemens slope 2" in loaded.phase_scaling
    raw = pydicom.dcmread(folder / "phase" / "00017.dcm").pixel_array  # echo 2
    expected = (2.0 * raw - 4096) * np.pi / 4096
    assert angle_error(gre.phase[:, :, 0, 1].T, expected) < 1e-5
    assert isinstance(gre, MultiEchoGRE)


def test_real_philips_enhanced_part_from_the_private_frame_item(shared_data: Path):
    path = (
        shared_data / "philips-3t-2echo" / "enhanced" / "2001_WIP_fcMRI_Field_Mapping_e2_phMag.dcm"
    )
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    standard = [f.part for f in summarize(ds).frames]
    for frame in ds.PerFrameFunctionalGroupsSequence:
        del frame.MRImageFrameTypeSequence  # only Philips' (2005,140F) item is left
    private = [f.part for f in summarize(ds).frames]
    assert private == standard
    assert standard.count(Part.MAGNITUDE) == standard.count(Part.PHASE) == 106


@pytest.mark.parametrize("style", STYLES)
def test_gre_series_are_not_t1_weighted(style: str, sim: Simulation, tmp_path: Path):
    write_dicom(sim.gre, tmp_path, style)
    assert not any(info.t1_evidence for info in summarize_files(_files(tmp_path)))
    loaded = _only(load_folder(tmp_path))
    assert loaded.t1w is None and loaded.t1w_note == "" and loaded.t1w_error == ""


def test_a_t1_weighted_magnitude_series_is_not_a_problem(sim: Simulation, tmp_path: Path):
    one = replace(sim.gre, magnitude=sim.gre.magnitude[..., :1], phase=sim.gre.phase[..., :1],
                  echo_times_s=sim.gre.echo_times_s[:1])
    for name, description in (("plain", "gre_single"), ("t1", "t1_fl3d_tra")):
        folder = tmp_path / name
        write_dicom(one, folder, "siemens", SimStudyInfo(series_description=description))
        shutil.rmtree(next(folder.glob("*_P")))
    plain = summarize_files(_files(tmp_path / "plain"))
    reason = _only_passed_over(group_acquisitions(plain))  # one echo, no phase: not QSM
    assert "one echo, magnitude only" in reason and "series 5 " in reason
    assert "no phase" in _only_problem(group_acquisitions(plain, pass_over=False))
    # named T1: a reference candidate (too coarse here, and no GRE to serve), never a problem
    reason = _only_passed_over(group_acquisitions(summarize_files(_files(tmp_path / "t1"))))
    assert "T1-weighted" in reason and "not usable as a reference" in reason


# ---------------------------------------------------------------------------------------------
# session triage


def test_a_whole_clinical_session_is_passed_over_series_by_series(shared_data: Path):
    """The XA30 session (T1w, BOLD, field map, DWI and ASL with their derived maps, no
    multi-echo GRE): no acquisition and no problem; every series is passed over with a reason
    naming what it is."""
    folder = shared_data / "siemens-xa30-session"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent (real data: see ../shared/data/README.md)")
    infos = summarize_files(p for p in sorted(folder.rglob("*.dcm")))
    results = group_acquisitions(infos)
    assert all(isinstance(r, PassedOver) for r in results), [
        r.reason for r in results if not isinstance(r, PassedOver)]
    why = {n: r.why for r in results for n in r.series_numbers}
    assert sorted(why) == sorted({i.series_number for i in infos})
    assert "BOLD" in why[7]
    assert "phase-difference field map" in why[8] and why[8] == why[9]
    for n in (10, 11, 12, 13, 14, 16, 17, 19, 20, 21, 22, 24):
        assert why[n].startswith("diffusion-weighted"), why[n]
    for n in (25, 27, 28):
        assert why[n].startswith("arterial spin labelling"), why[n]
    assert "derived" in why[11] and "derived" not in why[10]
    assert why[5].startswith("T1-weighted") and why[6].startswith("T1-weighted")
    # without triage (pass_over off) the same session is all problems
    strict = group_acquisitions(infos, pass_over=False)
    assert strict and not any(isinstance(r, PassedOver) for r in strict
                              if "T1-weighted" not in r.reason)


def test_gre_candidates_that_cannot_be_used_stay_problems(sim: Simulation, tmp_path: Path):
    """Triage passes over only what plainly is not QSM: a multi-echo magnitude without its
    phase, or a single echo with phase, looked like a QSM candidate and is a problem."""
    write_dicom(sim.gre, tmp_path / "nophase", "siemens")
    shutil.rmtree(next((tmp_path / "nophase").glob("*_P")))
    reason = _only_problem(group_acquisitions(summarize_files(_files(tmp_path / "nophase"))))
    assert "no phase" in reason
    one = replace(sim.gre, magnitude=sim.gre.magnitude[..., :1], phase=sim.gre.phase[..., :1],
                  echo_times_s=sim.gre.echo_times_s[:1])
    write_dicom(one, tmp_path / "one", "siemens")
    reason = _only_problem(group_acquisitions(summarize_files(_files(tmp_path / "one"))))
    assert "1 echo, the rule needs at least 2" in reason
    # a DWI-labelled series with one echo and no phase is passed over, even under rules that
    # would plan a single magnitude echo
    write_dicom(one, tmp_path / "dwi", "siemens", SimStudyInfo(series_description="ep2d_dwi"))
    shutil.rmtree(next((tmp_path / "dwi").glob("*_P")))
    infos = summarize_files(_files(tmp_path / "dwi"))
    for rules in ({}, {"min_echoes": 1, "require_phase": False}):
        reason = _only_passed_over(group_acquisitions(infos, **rules))  # type: ignore[arg-type]
        assert "diffusion-weighted (series description 'ep2d_dwi')" in reason


def test_implausible_images_are_refused_when_loaded(sim: Simulation, tmp_path: Path):
    """Phase with a RescaleSlope of 0 (one value everywhere), a phase echo that is constant,
    and a magnitude that is zero everywhere: each a plain-language problem, never a result."""
    write_dicom(sim.gre, tmp_path / "slope0", "siemens")
    _rewrite(_files(next((tmp_path / "slope0").glob("*_P"))), RescaleSlope=0)
    assert "the phase images hold one value only (-4096)" in _only_problem(
        load_folder(tmp_path / "slope0"))
    with pytest.raises(ValueError, match="one value only"):
        phase_scaling_from_range(-4096, -4096)

    write_dicom(sim.gre, tmp_path / "flat", "philips")  # phase in mrad from the header
    for path in _files(tmp_path / "flat"):
        ds = pydicom.dcmread(path)
        if "P" in ds.ImageType and float(ds.EchoTime) > 12:
            ds.PixelData = np.full_like(ds.pixel_array, 7).tobytes()
            ds.save_as(path)
    reason = _only_problem(load_folder(tmp_path / "flat"))
    assert "the phase of echo 3 (TE 16 ms) is constant" in reason, reason

    write_dicom(sim.gre, tmp_path / "dark", "siemens")
    for path in _files(next((tmp_path / "dark").glob("*_M"))):
        ds = pydicom.dcmread(path)
        ds.PixelData = np.zeros_like(ds.pixel_array).tobytes()
        ds.save_as(path)
    reason = _only_problem(load_folder(tmp_path / "dark"))
    assert "the magnitude of echo 1 (TE 5 ms) is zero everywhere" in reason, reason


def _two_echoes(sim: Simulation) -> Simulation:
    return replace(sim.gre, magnitude=sim.gre.magnitude[..., :2],  # type: ignore[return-value]
                   phase=sim.gre.phase[..., :2], echo_times_s=sim.gre.echo_times_s[:2])


@pytest.mark.parametrize("mark", [
    {"RescaleType": "Hz", "ImageType": ["ORIGINAL", "PRIMARY", "OTHER"]},  # GE-like B0 map
    {"ImageType": ["ORIGINAL", "PRIMARY", "FIELD_MAP", "B0"]},  # Philips FIELD_MAP frames
])
def test_a_b0_field_map_is_named_a_field_map(mark: dict, sim: Simulation, tmp_path: Path):
    """Magnitude beside a computed B0 field map (Hz, or marked FIELD_MAP): passed over as a
    field map, not refused as "only magnitude"; a problem that says so when asked for."""
    write_dicom(_two_echoes(sim), tmp_path, "siemens")
    field = _files(next(tmp_path.glob("*_P")))
    _rewrite(field, **mark)
    infos = summarize_files(_files(tmp_path))
    assert {f.part for i in infos for f in i.frames} == {Part.MAGNITUDE, Part.FIELD_MAP}
    reason = _only_passed_over(group_acquisitions(infos))
    assert "a B0 field map (" in reason and "not the phase of every echo" in reason
    assert "only magnitude" not in reason
    reason = _only_problem(group_acquisitions(infos, pass_over=False))
    assert "no per-echo phase: magnitude (2 echoes) and a B0 field map" in reason


def test_field_map_frames_beside_per_echo_phase_leave_the_acquisition(sim: Simulation,
                                                                      tmp_path: Path):
    """Per-echo magnitude and phase plus FIELD_MAP images (Philips exports them together):
    the acquisition is planned from the magnitude and phase, and says what it left out."""
    write_dicom(_two_echoes(sim), tmp_path / "gre", "siemens")
    write_dicom(_two_echoes(sim), tmp_path / "map", "siemens")
    gre_phase = pydicom.dcmread(_files(next((tmp_path / "gre").glob("*_P")))[0])
    extra = _files(next((tmp_path / "map").glob("*_P")))
    for n, path in enumerate(extra):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = gre_phase.SeriesInstanceUID
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{n}9"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "FIELD_MAP", "B0"]
        ds.save_as(path)
    [plan] = group_acquisitions(summarize_files(_files(tmp_path / "gre") + extra))
    assert isinstance(plan, AcquisitionPlan) and plan.n_echoes == 2 and plan.phase is not None
    assert plan.left_out == (f"{len(extra)} field map images left out (a B0 field map, not "
                             "the phase of every echo)")
