"""A same-session T1w through the DICOM edge and the pipeline: the simulator writes it, the
grouping makes it the acquisition's reference (never a problem), the loader reads it on its
own grid, and the M1 analysis registers through it, or falls back to the GRE and says why."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from qsmnode.dicom.headers import summarize, t1_evidence
from qsmnode.dicom.load import (
    AcquisitionPlan,
    LoadedAcquisition,
    LoadedT1w,
    PassedOver,
    Problem,
    T1wReference,
    group_acquisitions,
    load_acquisition,
    load_folder,
    summarize_files,
)
from qsmnode.m1.result import M1Result, QualityFlag
from qsmnode.sim.scanner import ScanParams
from qsmnode.sim.vendor_dicom import SimStudyInfo, write_t1w_dicom
from tests.dicomutil import T1W_SCAN, t1w_image, write_t1w
from tests.nodeutil import write_study

SEED = 31
NORMATIVE_EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "m1_normative.example.toml"
DICOM_Z_SCORE = b"121416"  # DCM code of "Z-score of measurement"
def grouped(folder: Path) -> list[AcquisitionPlan | Problem]:
    return group_acquisitions(summarize_files(p for p in sorted(folder.rglob("*.dcm"))))


def split(results: list) -> tuple[list[AcquisitionPlan], list[PassedOver]]:
    """The plans and the passed-over series; asserts there is nothing else (no problem)."""
    plans = [r for r in results if isinstance(r, AcquisitionPlan)]
    passed = [r for r in results if isinstance(r, PassedOver)]
    assert len(plans) + len(passed) == len(results), results
    return plans, passed


# ---------------------------------------------------------------------------------------------
# the header rule


def _header(**attributes: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(("attributes", "expected"), [
    ({"ScanningSequence": ["GR", "IR"], "InversionTime": "1100"}, "inversion-prepared"),
    ({"ScanningSequence": "GR", "InversionTime": "450"}, "TI 450 ms"),  # GE BRAVO
    ({"ScanningSequence": ["GR", "IR"]}, "inversion-prepared"),
    ({"ScanningSequence": "GR", "SequenceName": "*tfl3d1_16ns"}, "SequenceName *tfl3d1_16ns"),
    ({"PulseSequenceName": "T1TFE"}, "PulseSequenceName T1TFE"),
    ({"SeriesDescription": "T1W_3D_TFE"}, "SeriesDescription 'T1W_3D_TFE'"),
    ({"SeriesDescription": "mp2rage_UNI_Images"}, "mp2rage"),
    ({"ProtocolName": "Sag 3D BRAVO"}, "ProtocolName 'Sag 3D BRAVO'"),
    # not T1: a spin-echo inversion (FLAIR), other contrasts, the GRE itself
    ({"ScanningSequence": ["SE", "IR"], "InversionTime": "2500"}, ""),
    ({"SeriesDescription": "t2_flair_sag_p2", "InversionTime": "1800"}, ""),
    ({"SeriesDescription": "gre_qsm_7T", "ScanningSequence": "GR",
      "SequenceName": "*fl3d4"}, ""),
    ({"SeriesDescription": "T1map_B1corrected"}, ""),  # a map, by name
])
def test_t1_evidence_rule(attributes: dict[str, Any], expected: str) -> None:
    ds = _header(**attributes)
    ti = attributes.get("InversionTime")
    found = t1_evidence(ds, False, None if ti is None else float(ti) / 1000)
    assert (expected in found) if expected else found == ""


def test_enhanced_inversion_recovery_is_t1_like() -> None:
    modifier = _header(InversionRecovery="YES", InversionTimes=[900.0])
    shared = _header(MRModifierSequence=[modifier])
    ds = _header(SOPClassUID="1.2.840.10008.5.1.4.1.1.4.1", EchoPulseSequence="GRADIENT",
                 SharedFunctionalGroupsSequence=[shared], SOPInstanceUID="1.2.3")
    info = summarize(ds)
    assert info.inversion_time_s == pytest.approx(0.9)
    assert "TI 900 ms" in info.t1_evidence
    ds.EchoPulseSequence = "SPIN"
    assert summarize(ds).t1_evidence == ""


# ---------------------------------------------------------------------------------------------
# simulator, grouping and loading


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], list[Path]]:
    """The small GRE (Siemens, magnitude series 5 and phase 6) and a T1w (series 2)."""
    root = tmp_path_factory.mktemp("t1w_study")
    gre = write_study(root / "in", "siemens", SEED)
    t1w = write_t1w(root / "in")
    return root / "in", gre, t1w


def test_the_simulated_t1w_is_an_mprage_of_the_same_study(
    study: tuple[Path, list[Path], list[Path]],
) -> None:
    _, gre_files, t1w_files = study
    gre = pydicom.dcmread(gre_files[0], stop_before_pixels=True)
    uids = set()
    for path in t1w_files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uids.add(ds.SOPInstanceUID)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
        assert (ds.StudyInstanceUID, ds.FrameOfReferenceUID) == (
            gre.StudyInstanceUID, gre.FrameOfReferenceUID)
        assert ds.SeriesInstanceUID != gre.SeriesInstanceUID and ds.SeriesNumber == 2
    assert list(ds.ScanningSequence) == ["GR", "IR"] and float(ds.InversionTime) == 1050
    assert ds.SeriesDescription == "t1_mprage_sag" and ds.SequenceName == "*tfl3d1_16ns"
    assert list(ds.ImageType)[:3] == ["ORIGINAL", "PRIMARY", "M"]
    assert len(uids) == len(t1w_files) == T1W_SCAN.shape[2]
    gre_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in gre_files}
    assert not uids & gre_uids


def test_grouping_makes_the_t1w_the_reference_of_the_acquisition(
    study: tuple[Path, list[Path], list[Path]],
) -> None:
    folder, _, t1w_files = study
    [plan] = grouped(folder)
    assert isinstance(plan, AcquisitionPlan)
    assert plan.series_numbers == (5, 6) and plan.t1w is not None
    assert plan.t1w.series_number == 2 and plan.t1w.shape == T1W_SCAN.shape
    assert plan.t1w.frame_of_reference_uid == plan.frame_of_reference_uid
    assert plan.t1w_note.startswith("T1w reference: series 2 't1_mprage_sag'")
    assert "TI 1050 ms" in plan.t1w_note
    assert len({r.path for r in plan.t1w.frames}) == len(t1w_files)

    [loaded] = load_folder(folder)
    assert isinstance(loaded, LoadedAcquisition) and loaded.t1w is not None
    assert not loaded.t1w_error
    t1w = loaded.t1w
    assert t1w.image.dtype == np.float32 and t1w.image.shape == T1W_SCAN.shape
    np.testing.assert_allclose(t1w.affine, T1W_SCAN.affine, atol=1e-4)
    truth = t1w_image()  # Siemens-like: stored = round(value · 4095 / max), no rescale
    stored = np.rint(truth.astype(np.float64) * (4095 / float(truth.max())))
    np.testing.assert_array_equal(t1w.image, stored)


def test_a_t1w_in_another_frame_of_reference_is_not_used(tmp_path: Path) -> None:
    write_study(tmp_path / "in", "siemens", SEED)
    for path in write_t1w(tmp_path / "in"):
        ds = pydicom.dcmread(path)
        ds.FrameOfReferenceUID = "2.25.1234567"
        ds.save_as(path, enforce_file_format=True)
    [plan], [t1w] = split(grouped(tmp_path / "in"))
    assert plan.t1w is None and t1w.series_numbers == (2,)
    assert t1w.why.startswith("T1-weighted") and "no acquisition of its study uses it" in t1w.why
    assert "series 2 't1_mprage_sag'" in plan.t1w_note
    assert "T1-weighted but not used" in plan.t1w_note
    assert "another Frame of Reference" in plan.t1w_note
    [loaded] = [x for x in load_folder(tmp_path / "in") if isinstance(x, LoadedAcquisition)]
    assert loaded.t1w is None
    assert loaded.t1w_note == plan.t1w_note and not loaded.t1w_error


def test_of_several_t1w_the_finest_then_the_latest_is_chosen(tmp_path: Path) -> None:
    write_study(tmp_path / "in", "siemens", SEED)
    coarse = dataclasses.replace(T1W_SCAN, voxel_size_mm=(2.0, 2.0, 2.0))
    write_t1w(tmp_path / "in", series_number=2)
    write_t1w(tmp_path / "in", series_number=3, series_description="t1_mprage_repeat")
    write_t1w(tmp_path / "in", coarse, series_number=4, series_description="t1_fast")
    [plan], passed = split(grouped(tmp_path / "in"))
    assert plan.t1w is not None
    assert sorted(n for p in passed for n in p.series_numbers) == [2, 4]  # not chosen
    assert plan.t1w.series_number == 3
    note = plan.t1w_note
    assert note.startswith("T1w reference: series 3 't1_mprage_repeat'")
    assert "series 2 't1_mprage_sag' (series UID" in note and "(an earlier series)" in note
    assert "series 4 't1_fast'" in note and "(coarser voxels)" in note


def test_an_unusable_t1w_is_noted_not_reported_as_a_problem(tmp_path: Path) -> None:
    write_study(tmp_path / "in", "siemens", SEED)
    files = write_t1w(tmp_path / "in")
    files[7].unlink()  # a slice missing in the middle: not a regular stack
    [plan], [t1w] = split(grouped(tmp_path / "in"))
    assert plan.t1w is None and "not usable as a reference" in t1w.why
    assert "not usable as a reference" in plan.t1w_note
    assert "not evenly spaced" in plan.t1w_note


def test_a_t1w_alone_is_neither_an_acquisition_nor_a_problem(tmp_path: Path) -> None:
    write_t1w(tmp_path / "in")
    plans, [t1w] = split(grouped(tmp_path / "in"))  # passed over, with why: not a problem
    assert not plans and t1w.why.startswith("T1-weighted (inversion-prepared gradient echo")
    assert "no acquisition of its study uses it" in t1w.why


def test_a_t1w_that_cannot_be_loaded_leaves_the_acquisition_loaded(
    study: tuple[Path, list[Path], list[Path]],
) -> None:
    folder, _, t1w_files = study
    [plan] = grouped(folder)
    assert isinstance(plan, AcquisitionPlan)
    broken = str(t1w_files[3])

    def read(path: str) -> Dataset:
        if path == broken:
            raise OSError("disk error")
        return pydicom.dcmread(path)

    loaded = load_acquisition(plan, read=read)
    assert loaded.t1w is None and loaded.gre.shape == (24, 28, 12)
    assert loaded.t1w_error.startswith("the T1w series 2 't1_mprage_sag'")
    assert "could not be loaded" in loaded.t1w_error and "disk error" in loaded.t1w_error
    assert load_acquisition(plan, with_t1w=False).t1w is None


# ---------------------------------------------------------------------------------------------
# the pipeline's fallback to the GRE


@pytest.mark.parametrize("outcome", ["raises", "poor", "good"])
def test_the_gre_is_registered_when_the_t1w_cannot_serve(
    outcome: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import SimpleITK as sitk

    import qsmnode.m1.analysis as analysis
    from qsmnode.m1.register import Registration

    def registration(nmi: float) -> Registration:
        return Registration(sitk.Euler3DTransform(), nmi, 1.0, -0.5, 0.0)

    gre_registration, t1w_registration = registration(1.2), registration(
        0.2 if outcome == "poor" else 1.2)

    def fake_register(*args: Any, t1w: Any = None, **kwargs: Any) -> Registration:
        if t1w is None:
            return gre_registration
        if outcome == "raises":
            raise ValueError("the subject mask has 3 voxels at 2.0 mm: nothing to register")
        return t1w_registration

    monkeypatch.setattr(analysis, "register_subject",
                        lambda m, a, b, atlas, params=None, t1w=None: fake_register(t1w=t1w))
    volume = np.ones((4, 4, 4), np.float32)
    reg, why_not = analysis.register_t1w_or_gre(
        volume, np.eye(4), volume > 0, None,  # type: ignore[arg-type]
        t1w=analysis.SameSessionT1w(volume, np.eye(4)))
    expected = {
        "raises": "its registration to the template failed (the subject mask has 3 voxels",
        "poor": "its registration to the template is below the acceptable level "
                "(normalised mutual information 0.200 < 1.07)",
        "good": "",
    }[outcome]
    assert why_not.startswith(expected) and bool(why_not) == bool(expected)
    assert reg is (t1w_registration if outcome == "good" else gre_registration)


@pytest.mark.parametrize("case", ["not registered", "not loaded", "used"])
def test_the_m1_stage_says_whether_the_t1w_was_used_and_why_not(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import qsmnode.pipeline as pipeline

    calls: list[bool] = []

    def fake_analyse(*args: Any, t1w: Any = None, **kwargs: Any) -> tuple[M1Result, dict]:
        calls.append(t1w is not None)
        empty = np.zeros((2, 2, 2), np.float32)
        flag = QualityFlag("registration_nmi", True, 1.1, "registered")
        why = ("its registration to the template is below the acceptable level "
               "(normalised mutual information 0.200)") if case == "not registered" else ""
        return M1Result(empty.astype(np.uint8), empty, empty, (), (flag,), why), {}

    monkeypatch.setattr(pipeline, "analyse_m1", fake_analyse)
    reference = T1wReference("1.2.3", "1.2.4", "1.2.5", 2, "t1_mprage_sag", "TI 900 ms", 4, 4,
                             np.eye(4), ())
    t1w = LoadedT1w(np.ones((4, 4, 4), np.float32), np.eye(4), reference)
    params = pipeline.PipelineParams(
        m1_atlas=object(),  # type: ignore[arg-type]
        t1w=None if case == "not loaded" else t1w,
        t1w_error="the T1w series 2 could not be loaded: disk error"
        if case == "not loaded" else "",
    )
    loaded = SimpleNamespace(gre=SimpleNamespace(affine=np.eye(4)), study_uid="1.2.3")
    ctx = pipeline._Context(loaded, params)  # type: ignore[arg-type]
    ctx.qsm = SimpleNamespace(chi_ppm=None, r2star_per_s=None, magnitude=None,  # type: ignore
                              qsm_mask=None)
    pipeline._m1(ctx)

    assert calls == [case != "not loaded"]  # one analysis: the fallback is inside it
    assert ctx.m1 is not None
    flag = next(f for f in ctx.m1.flags if f.name == "t1w_reference")
    record = ctx.m1_record["t1w"]
    if case == "used":
        assert flag.passed and "series 2 't1_mprage_sag'" in flag.text
        assert record["used"] is True and "why_not" not in record
        return
    assert not flag.passed and "the GRE magnitude was registered instead" in flag.text
    why = {"not registered": "below the acceptable level (normalised mutual information 0.200)",
           "not loaded": "could not be loaded: disk error"}[case]
    assert why in flag.text
    assert record["used"] is False and why in record["why_not"]


# ---------------------------------------------------------------------------------------------
# end to end: the anatomy phantom's GRE slab and T1w, through DICOM and the pipeline


@pytest.mark.slow
def test_process_acquisition_registers_through_the_t1w(tmp_path: Path) -> None:
    from qsmnode.node.jobs import process_acquisition
    from qsmnode.node.normative import read_normative_table
    from qsmnode.node.outbox import encode
    from qsmnode.sim.anatomy import simulate_anatomy, simulate_t1w
    from qsmnode.sim.scanner import preset
    from qsmnode.sim.vendor_dicom import write_dicom

    started = time.perf_counter()
    seed = 2
    sim = simulate_anatomy(preset("small-slab"), pose_seed=seed)
    scan = ScanParams(shape=(136, 160, 84), voxel_size_mm=(1.2, 1.2, 1.2),
                      rotation_deg=(-6.0, 4.0, 0.0), centre_mm=(0.0, -18.0, 40.0))
    image, affine, _ = simulate_t1w(scan, pose_seed=seed)
    study = SimStudyInfo(seed=seed)
    files = write_dicom(sim.gre, tmp_path / "in", "enhanced", study)
    write_t1w_dicom(image, affine, tmp_path / "in", study)
    [loaded] = load_folder(tmp_path / "in")
    assert isinstance(loaded, LoadedAcquisition) and loaded.t1w is not None
    np.testing.assert_allclose(loaded.t1w.affine, affine, atol=1e-4)

    # With the example normative table (``[pipeline] m1_normative_table``): z-scores too.
    record, datasets = process_acquisition(loaded, [str(f) for f in files],
                                           m1_normative_table=NORMATIVE_EXAMPLE)
    m1 = record["m1"]
    assert "error" not in m1, m1
    flags = {f["name"]: f for f in m1["flags"]}
    assert flags["registration_nmi"]["passed"], flags["registration_nmi"]
    assert "same-session T1w" in flags["registration_nmi"]["text"]
    assert flags["t1w_reference"]["passed"]
    assert "series 2 't1_mprage_sag' (1.2×1.2×1.2 mm)" in flags["t1w_reference"]["text"]
    assert m1["t1w"]["used"] is True and m1["t1w"]["series_number"] == 2
    assert m1["t1w"]["note"].startswith("T1w reference: series 2")
    [report] = [ds for ds in datasets if ds.Modality == "SR"]
    assert "t1w_reference" in str(report.ContentSequence)
    table = read_normative_table(NORMATIVE_EXAMPLE)  # partial: some rows have no norm
    covered = [m for m in m1["measurements"] if m["covered"]]
    normed = [m for m in covered if table.get(m["area"], m["layer"]) is not None]
    assert normed and all(m["chi_z"] is not None for m in normed)
    assert all(m["chi_z"] is None for m in m1["measurements"] if m not in normed)
    assert DICOM_Z_SCORE in encode(report)
    print(f"GRE + T1w through process_acquisition in {time.perf_counter() - started:.1f} s")
