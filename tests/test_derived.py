"""The derived DICOM objects: validity (dciodvfy, dcentvfy, dsrdump), identity, deterministic
UIDs, geometry and values, on a simulated study written as classic Siemens and as Enhanced MR."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from qsmnode.dicom.derived import (
    BuildContext,
    DerivedObjects,
    DerivedUids,
    build_derived,
    build_derived_objects,
    source_reader,
)
from qsmnode.dicom.derived.derived_mr import QSM_MR, build_derived_mr
from qsmnode.dicom.derived.key_images import choose_slices
from qsmnode.dicom.derived.segmentation import build_segmentation, segment_name, segment_rgb
from qsmnode.dicom.derived.sr import build_report
from qsmnode.dicom.derived.uids import uid_from_name
from qsmnode.dicom.geometry import affine_from_slices, volume_from_frames
from qsmnode.dicom.load import LoadedAcquisition, load_folder
from qsmnode.m1.result import AREAS, LAYERS, M1Result, segment_label
from qsmnode.sim.scanner import Simulation, preset, simulate
from qsmnode.sim.vendor_dicom import SimStudyInfo, write_dicom
from tests.conftest import require_tool
from tests.derivedutil import dciodvfy_errors, m1_blocks, m1_from_truth, run

VERSION = "1.2.3"
STYLES = ("siemens", "enhanced")


@pytest.fixture(scope="module")
def sim() -> Simulation:
    """The tiny preset's head on a 4 mm grid (24 slices, 3 echoes): every M1 segment present."""
    scan = preset(
        "tiny",
        shape=(42, 50, 24),
        voxel_size_mm=(4.0, 4.0, 6.0),
        echo_times_s=(0.005, 0.0105, 0.016),
    )
    return simulate(scan)


@pytest.fixture(scope="module")
def m1(sim: Simulation) -> M1Result:
    return m1_from_truth(sim)


@dataclass
class Study:
    style: str
    sources: list[Path]
    loaded: LoadedAcquisition
    objects: DerivedObjects
    out: Path
    seconds: float

    def read(self, ds: Dataset) -> Dataset:
        return pydicom.dcmread(self.out / file_name(ds))


def file_name(ds: Dataset) -> str:
    return f"{ds.Modality}_{int(ds.SeriesNumber)}_{int(ds.InstanceNumber):04d}.dcm"


def save_all(datasets: list[Dataset], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = out / file_name(ds)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="module", params=STYLES)
def study(request, sim, m1, tmp_path_factory) -> Study:
    style = request.param
    root = tmp_path_factory.mktemp(f"derived-{style}")
    sources = write_dicom(sim.gre, root / "source", style, SimStudyInfo(seed=7))
    (loaded,) = load_folder(root / "source")
    assert isinstance(loaded, LoadedAcquisition)
    t0 = time.perf_counter()
    objects = build_derived_objects(
        loaded,
        sim.truth.chi_ppm,
        sim.truth.r2star_per_s,
        m1,
        source_reader(sources),
        VERSION,
    )
    seconds = time.perf_counter() - t0
    save_all(objects.datasets, root / "derived")
    return Study(style, sources, loaded, objects, root / "derived", seconds)


def _all_uids(ds: Dataset) -> list[tuple[str, str]]:
    """Every UI element of a dataset, recursively, as (keyword path, value)."""
    out = []

    def walk(d: Dataset, prefix: str) -> None:
        for elem in d:
            if elem.VR == "SQ":
                for i, item in enumerate(elem.value):
                    walk(item, f"{prefix}{elem.keyword}[{i}].")
            elif elem.VR == "UI" and elem.value:
                values = elem.value if elem.VM > 1 else [elem.value]
                out.extend((f"{prefix}{elem.keyword}", str(v)) for v in values)

    walk(ds, "")
    return out


# --- validity --------------------------------------------------------------------------------


def test_every_object_passes_dciodvfy(study: Study) -> None:
    require_tool("dciodvfy", "dicom3tools")
    failures = {}
    for path in sorted(study.out.iterdir()):
        errors = dciodvfy_errors(path)
        if errors:
            failures[path.name] = errors
    assert not failures, "\n".join(f"{n}: {e}" for n, es in failures.items() for e in es)


def test_dcentvfy_finds_source_and_derived_consistent(study: Study) -> None:
    require_tool("dcentvfy", "dicom3tools")
    files = [str(p) for p in study.sources] + [str(p) for p in sorted(study.out.iterdir())]
    out = run(["dcentvfy", *files])
    errors = [line for line in (out.stdout + out.stderr).splitlines() if "Error" in line]
    assert not errors, "\n".join(errors)


def test_objects_are_all_there(study: Study, sim: Simulation, m1: M1Result) -> None:
    o = study.objects
    nk = sim.gre.shape[2]
    assert len(o.qsm_images) == nk and len(o.r2star_images) == nk
    assert o.segmentation is not None and len(o.segmentation.SegmentSequence) == 12
    assert o.report is not None
    hand, foot = choose_slices(m1.labels, nk)
    assert [ds.ImageComments for ds in o.key_images] == [
        f"QSM through the hand knob, slice {hand.k + 1} of {nk}",
        f"QSM through the foot area, slice {foot.k + 1} of {nk}",
    ]
    assert len({ds.SeriesInstanceUID for ds in o.datasets}) == 8
    numbers = sorted({int(ds.SeriesNumber) for ds in o.datasets})
    assert numbers == [501, 502, 503, 504, 505, 506, 507, 508]
    assert study.seconds < 30


# --- identity and UIDs -----------------------------------------------------------------------


def test_same_patient_study_and_frame_of_reference(study: Study) -> None:
    source = pydicom.dcmread(study.sources[0], stop_before_pixels=True)
    keywords = (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyDescription",
    )
    with_for = 0
    for ds in (study.read(d) for d in study.objects.datasets):
        for keyword in keywords:
            assert str(ds.get(keyword) or "") == str(source.get(keyword) or ""), (
                file_name(ds),
                keyword,
            )
        if "FrameOfReferenceUID" in ds:
            assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
            with_for += 1
    assert with_for >= 2 + 2 * len(study.objects.qsm_images) + 1


def test_uids_are_deterministic_and_versioned(study: Study, sim, m1) -> None:
    """Loading and processing the same files again gives byte-identical UIDs (every UI element
    of every object); another algorithm version gives new series and instance UIDs."""
    (reloaded,) = load_folder(study.out.parent / "source")
    reader = source_reader(study.sources)
    args = (reloaded, sim.truth.chi_ppm, sim.truth.r2star_per_s, m1, reader)
    again = build_derived(*args, VERSION)
    first = [_all_uids(ds) for ds in study.objects.datasets]
    assert [_all_uids(ds) for ds in again] == first
    other = build_derived(*args, VERSION + "-dev")
    mine = {
        uid for ds in study.objects.datasets for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID)
    }
    theirs = {uid for ds in other for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID)}
    assert not mine & theirs
    assert {ds.StudyInstanceUID for ds in other} == {study.loaded.study_uid}
    for _, uid in (u for uids in first for u in uids):
        assert len(uid) <= 64 and re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid)
    sops = [ds.SOPInstanceUID for ds in study.objects.datasets]
    assert len(set(sops)) == len(sops)
    assert all(uid.startswith("2.25.") for uid in sops)


def test_uid_factory() -> None:
    a = DerivedUids("f" * 64, "qsmnode", "1")
    assert a.uid("x", 1) == DerivedUids("f" * 64, "qsmnode", "1").uid("x", 1)
    assert a.uid("x", 1) != a.uid("x", 2) != a.uid("y", 1)
    assert a.uid("x") != DerivedUids("f" * 64, "qsmnode", "2").uid("x")
    assert uid_from_name("a").startswith("2.25.") and len(uid_from_name("a")) <= 44


# --- parametric maps -------------------------------------------------------------------------


def _frames_to_volume(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """A multi-frame image back to ``(volume [i, j, k], affine)`` from its per-frame planes."""
    shared = ds.SharedFunctionalGroupsSequence[0]
    orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    measures = shared.PixelMeasuresSequence[0]
    positions = [
        f.PlanePositionSequence[0].ImagePositionPatient for f in ds.PerFrameFunctionalGroupsSequence
    ]
    affine, order = affine_from_slices(
        [orientation] * len(positions), positions, measures.PixelSpacing
    )
    frames = ds.pixel_array.reshape(len(positions), ds.Rows, ds.Columns)
    return volume_from_frames([frames[i] for i in order]), affine


@pytest.mark.parametrize("kind", ["qsm", "r2star"])
def test_parametric_map_round_trips_geometry_and_values(study: Study, sim, kind) -> None:
    pm = study.objects.qsm_map if kind == "qsm" else study.objects.r2star_map
    assert pm is not None
    path = study.out / file_name(pm)
    read = hd.pm.ParametricMap.from_file(path)
    assert read.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
    volume, affine = _frames_to_volume(pydicom.dcmread(path))
    np.testing.assert_allclose(affine, study.loaded.gre.affine, atol=1e-3)
    np.testing.assert_allclose(affine, sim.gre.affine, atol=1e-3)
    truth = sim.truth.chi_ppm if kind == "qsm" else sim.truth.r2star_per_s
    assert volume.dtype == np.float32
    np.testing.assert_array_equal(volume, np.nan_to_num(truth.astype(np.float32)))

    ds = pydicom.dcmread(path)
    mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    unit = mapping.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == (
        ("ppm", "UCUM") if kind == "qsm" else ("/s", "UCUM")
    )
    assert mapping.LUTLabel == ("CHI_PPM" if kind == "qsm" else "R2STAR_PER_S")
    voi = ds.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    if kind == "qsm":
        assert float(voi.WindowWidth) < 1 and voi.VOILUTFunction == "LINEAR_EXACT"
    assert ds.SeriesDescription == ("QSM (ppm)" if kind == "qsm" else "R2* (1/s)")
    assert ds.BodyPartExamined == "HEAD"
    assert ds.ContentLabel == ("QSM" if kind == "qsm" else "R2STAR")
    # echo 1 is the source, the other echoes further sources
    referenced = {
        item.ReferencedSOPInstanceUID
        for s in ds.ReferencedSeriesSequence
        for item in s.ReferencedInstanceSequence
    }
    echo1 = {row[0].sop_instance_uid for row in study.loaded.magnitude_sources}
    others = {ref.sop_instance_uid for row in study.loaded.magnitude_sources for ref in row}
    assert echo1 <= referenced and others <= referenced
    first = ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert len(first.SourceImageSequence) >= study.loaded.gre.n_echoes


# --- classic derived MR ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["qsm", "r2star"])
def test_derived_mr_images_hold_scaled_integers(study: Study, sim, kind) -> None:
    images = study.objects.qsm_images if kind == "qsm" else study.objects.r2star_images
    read = [study.read(ds) for ds in images]
    affine, order = affine_from_slices(
        [ds.ImageOrientationPatient for ds in read],
        [ds.ImagePositionPatient for ds in read],
        read[0].PixelSpacing,
    )
    np.testing.assert_allclose(affine, sim.gre.affine, atol=1e-3)
    volume = volume_from_frames([read[i].pixel_array for i in order])
    assert volume.dtype == np.int16
    truth = sim.truth.chi_ppm if kind == "qsm" else sim.truth.r2star_per_s
    scale = 1000.0 if kind == "qsm" else 10.0
    expected = np.clip(np.rint(truth.astype(np.float64) * scale), -32768, 32767)
    np.testing.assert_array_equal(volume, expected.astype(np.int16))
    for k, ds in enumerate(read):
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "QSM" if kind == "qsm" else "R2STAR"]
        assert ds.SeriesDescription == ("QSM [ppb]" if kind == "qsm" else "R2* [0.1/s]")
        source = study.loaded.magnitude_sources[order.tolist().index(k)][0]
        ref = ds.ReferencedImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == source.sop_instance_uid
        assert ref.get("ReferencedFrameNumber") == source.frame_number
        assert VERSION in ds.DerivationDescription
    assert float(read[0].WindowWidth) == (300.0 if kind == "qsm" else 1000.0)


# --- segmentation ----------------------------------------------------------------------------


def test_segmentation_matches_the_labels(study: Study, m1: M1Result) -> None:
    seg_ds = study.objects.segmentation
    assert seg_ds is not None
    path = study.out / file_name(seg_ds)
    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "BINARY"
    ds = pydicom.dcmread(path)
    geometry = BuildContext.create(study.loaded, source_reader(study.sources), VERSION).geometry
    positions = np.asarray(geometry.positions)
    masks: dict[int, np.ndarray] = {}
    pixels = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    for f, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        number = frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        ipp = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        k = int(np.argmin(np.linalg.norm(positions - ipp, axis=1)))
        assert np.linalg.norm(positions[k] - ipp) < 1e-3
        mask = masks.setdefault(number, np.zeros(m1.labels.shape, dtype=bool))
        mask[:, :, k] = pixels[f].T.astype(bool)
    segments = {int(s.SegmentNumber): s for s in ds.SegmentSequence}
    assert sorted(masks) == sorted(segments) == list(range(1, 13))
    for number, item in segments.items():
        area, layer = AREAS[(number - 1) // 3], LAYERS[(number - 1) % 3]
        assert item.SegmentLabel == segment_name(area, layer)
        np.testing.assert_array_equal(masks[number], m1.labels == segment_label(area, layer))
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        assert (prop.CodeValue, prop.CodingSchemeDesignator) == ("40146001", "SCT")
        side = prop.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue
        assert side == ("7771000" if area.startswith("left") else "24028007")
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
        assert item.PrimaryAnatomicStructureSequence[0].CodeValue == "UBERON:0001384"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("qsmnode", VERSION)
        assert item.SegmentAlgorithmType == "AUTOMATIC"


# --- structured report -----------------------------------------------------------------------

_NUM = re.compile(r'NUM:\(,,"(?P<name>[^"]+)"\)="(?P<value>[^"]+)" \((?P<unit>[^,]+),')
_CODE = re.compile(
    r'CODE:\(,,"(?P<name>[^"]+)"\)=\((?P<value>[^,]*),(?P<scheme>[^,]*),"(?P<meaning>[^"]*)"\)'
)
_TEXT = re.compile(r'TEXT:\(,,"(?P<name>[^"]+)"\)="(?P<value>[^"]*)"')


def parse_dsrdump(text: str) -> dict[tuple[str, str, str], float]:
    """``(tracking identifier, concept, derivation or "z") → value`` of every NUM item."""
    values: dict[tuple[str, str, str], float] = {}
    group = ""
    last: tuple[str, float] | None = None  # the last NUM: its concept and value
    last_depth = 0
    for line in text.splitlines():
        depth = len(line) - len(line.lstrip())
        if (t := _TEXT.search(line)) and t["name"] == "Tracking Identifier":
            group, last = t["value"], None
            continue
        if (n := _NUM.search(line)) is not None:
            if n["name"] == "Z-Score of measurement" and last is not None:
                values[(group, last[0], "z")] = float(n["value"])
            else:
                last = (n["name"], float(n["value"]))
                values[(group, n["name"], "")] = float(n["value"])
                last_depth = depth
            continue
        c = _CODE.search(line)
        if c is not None and c["name"] == "Derivation" and last is not None and depth > last_depth:
            name, value = last
            values.pop((group, name, ""), None)
            values[(group, name, c["meaning"])] = value
    return values


def expected_table(m1: M1Result, voxel_mm3: float) -> dict[tuple[str, str, str], float]:
    out = {}
    for m in m1.measurements:
        group = (
            segment_name(m.area, m.layer)
            if m.layer != "all"
            else (f"M1 {m.area.replace('_', ' ')} all layers")
        )
        if not m.covered:
            continue
        rows = {
            ("Magnetic Susceptibility", "Mean"): m.chi_mean_ppm,
            ("Magnetic Susceptibility", "Standard Deviation"): m.chi_sd_ppm,
            ("Magnetic Susceptibility", "Median"): m.chi_median_ppm,
            ("T2* Weighted MR Signal Intensity", "Mean"): m.t2star_signal_ratio,
            ("R2*", "Mean"): m.r2star_mean_per_s,
            ("Thickness", "Mean"): m.thickness_mean_mm,
            ("Quantity", ""): m.voxel_count,
            ("Volume", ""): m.voxel_count * voxel_mm3,
        }
        for (name, derivation), value in rows.items():
            out[(group, name, derivation)] = float(value)
        if m.chi_z is not None:
            out[(group, "Magnetic Susceptibility", "z")] = m.chi_z
        if m.t2star_signal_ratio_z is not None:
            out[(group, "T2* Weighted MR Signal Intensity", "z")] = m.t2star_signal_ratio_z
    return out


def test_sr_renders_and_holds_the_table(study: Study, sim, m1: M1Result) -> None:
    require_tool("dsrdump", "dcmtk")
    sr = study.objects.report
    assert sr is not None
    out = run(["dsrdump", str(study.out / file_name(sr))])
    assert out.returncode == 0, out.stderr
    got = parse_dsrdump(out.stdout)
    voxel_mm3 = float(np.prod(sim.gre.voxel_size_mm))
    want = expected_table(m1, voxel_mm3)
    assert want, "the test table is empty"
    for key, value in want.items():
        assert key in got, f"missing {key}"
        assert math.isclose(got[key], value, rel_tol=1e-9, abs_tol=1e-12), (key, got[key], value)
    assert 'Device Observer Name")="qsmnode ' + VERSION in out.stdout
    assert '"Algorithm Version")="' + VERSION in out.stdout
    assert "Referenced Segment" in out.stdout
    assert "Usable - Meets the quality control standard" in out.stdout


def test_sr_references_seg_segments_and_sources(study: Study) -> None:
    sr = study.read(study.objects.report)
    seg = study.objects.segmentation
    tracking = {s.TrackingUID: int(s.SegmentNumber) for s in seg.SegmentSequence}
    found = 0
    for group in sr.ContentSequence:
        if group.ConceptNameCodeSequence[0].CodeValue != "126010":  # Imaging Measurements
            continue
        for item in group.ContentSequence:
            uid = next((c.UID for c in item.ContentSequence if c.ValueType == "UIDREF"), None)
            refs = [c for c in item.ContentSequence if c.ValueType == "IMAGE"]
            segment = [
                r.ReferencedSOPSequence[0]
                for r in refs
                if r.ConceptNameCodeSequence[0].CodeMeaning == "Referenced Segment"
            ]
            if not segment:
                continue
            found += 1
            ref = segment[0]
            assert ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
            assert int(ref.ReferencedSegmentNumber) == tracking[uid]
            sources = [
                r for r in refs if "Source Image" in r.ConceptNameCodeSequence[0].CodeMeaning
            ]
            assert sources
    assert found == 12
    evidence = {
        item.ReferencedSOPInstanceUID
        for study_item in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study_item.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    echo1 = {row[0].sop_instance_uid for row in study.loaded.magnitude_sources}
    assert seg.SOPInstanceUID in evidence and echo1 <= evidence
    assert study.objects.qsm_map.SOPInstanceUID in evidence


# --- key images ------------------------------------------------------------------------------


def test_key_images_are_rgb_with_outlines_and_table(study: Study, m1: M1Result) -> None:
    nk = m1.labels.shape[2]
    choices = choose_slices(m1.labels, nk)
    assert [c.purpose for c in choices] == ["hand knob", "foot area"]
    hand = np.isin(m1.labels, range(1, 7)).sum(axis=(0, 1))
    assert choices[0].k == int(np.argmax(hand))
    for sc, choice in zip(study.objects.key_images, choices, strict=True):
        ds = study.read(sc)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
        assert ds.BitsAllocated == 8
        pixels = ds.pixel_array
        assert pixels.shape[2] == 3 and pixels.shape[1] > pixels.shape[0]
        colours = {tuple(c) for c in pixels.reshape(-1, 3)[::7]}
        parts = ("hand",) if choice.purpose == "hand knob" else ("foot",)
        outline = [segment_rgb(a, "deep") for a in AREAS if a.endswith(parts)]
        assert any(c in colours for c in outline)
        assert len(colours) > 50  # grey levels, outlines, text
        assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == (
            study.loaded.magnitude_sources[choice.k][0].sop_instance_uid
        )


def test_the_key_image_names_the_largest_deep_asymmetry_without_norms(m1: M1Result) -> None:
    from qsmnode.dicom.derived.key_images import findings

    m1 = replace(m1, measurements=tuple(replace(m, chi_z=None) for m in m1.measurements))
    differences = {}
    for limb in ("hand", "foot"):
        left, right = (m1.measurement(f"{side}_{limb}", "deep") for side in ("left", "right"))
        if left.covered and right.covered:
            differences[limb] = left.chi_mean_ppm - right.chi_mean_ppm
    limb = max(differences, key=lambda k: abs(differences[k]))
    lines = findings(m1)
    assert lines[0].startswith("no z-scores")
    assert f"largest left-right deep-layer difference: {limb} {differences[limb]:+.4f} ppm" \
        in lines[1]


def test_the_key_image_flags_rows_beyond_the_z_limit_in_warning_colour(m1: M1Result) -> None:
    from qsmnode.dicom.derived.key_images import WARN, Z_FLAG, findings, render_summary

    target = m1.measurement("left_hand", "deep")
    assert target.covered
    scored = replace(m1, measurements=tuple(
        replace(m, chi_z=Z_FLAG + 1.0 if m is target else 0.3) for m in m1.measurements))
    assert [line.split(":")[0] for line in findings(scored)] == ["FLAGGED  left hand deep"]
    k = int(np.argmax((m1.labels > 0).sum(axis=(0, 1))))
    args = (np.zeros(m1.labels.shape[:2], np.float32), m1.labels[:, :, k], (1.0, 1.0),
            ("R", "P"), "QSM", "slice")
    warned = [int((np.abs(img.astype(int) - WARN).sum(axis=-1) == 0).sum())
              for img in (render_summary(*args, m1=replace(m1, measurements=tuple(
                  replace(m, chi_z=0.3) for m in m1.measurements))),
                          render_summary(*args, m1=scored))]
    assert warned[1] > warned[0] + 200  # the row and the FLAGGED line in the warning colour


def test_the_key_image_flags_at_the_sites_z_flag(m1: M1Result) -> None:
    """``[pipeline] z_flag``: z 2.5 is flagged at the default 2, not at 3; the legend says
    which threshold."""
    from qsmnode.dicom.derived.key_images import WARN, Z_FLAG, findings, legend, render_summary

    target = m1.measurement("left_hand", "deep")
    assert target.covered and Z_FLAG == 2.0
    scored = replace(m1, measurements=tuple(
        replace(m, chi_z=2.5 if m is target else 0.3) for m in m1.measurements))
    assert [line.split(":")[0] for line in findings(scored)] == ["FLAGGED  left hand deep"]
    assert not any(line.startswith("FLAGGED") for line in findings(scored, z_flag=3.0))
    assert [line.split(":")[0] for line in findings(scored, z_flag=2.5)] == [
        "FLAGGED  left hand deep"]  # at the threshold: flagged
    assert "|z| >= 3 flagged" in legend(3.0)[0] and "|z| >= 2 flagged" in legend()[0]
    k = int(np.argmax((m1.labels > 0).sum(axis=(0, 1))))
    args = (np.zeros(m1.labels.shape[:2], np.float32), m1.labels[:, :, k], (1.0, 1.0),
            ("R", "P"), "QSM", "slice")
    warned = [int((np.abs(img.astype(int) - WARN).sum(axis=-1) == 0).sum())
              for img in (render_summary(*args, m1=scored),
                          render_summary(*args, m1=scored, z_flag=3.0))]
    assert warned[0] > warned[1] + 200  # the row and the FLAGGED line only at the default


def test_the_key_image_flags_the_deep_layer_finding_as_the_kos_does(m1: M1Result) -> None:
    """A middle layer beyond the threshold is shown (its row, a "beyond z" line) but is not the
    FLAGGED finding; the KOS's reason (deep layers) agrees."""
    from qsmnode.dicom.derived.key_images import findings
    from qsmnode.dicom.derived.kos import kos_reason

    middle = m1.measurement("left_hand", "middle")
    assert middle.covered
    scored = replace(m1, measurements=tuple(
        replace(m, chi_z=2.6 if m is middle else 0.3) for m in m1.measurements))
    lines = findings(scored)
    assert not any(line.startswith("FLAGGED") for line in lines)
    assert "beyond z (not the deep-layer finding): left hand middle, z +2.6" in lines
    assert "within z +/-2" in kos_reason(scored)
    both = replace(scored, measurements=tuple(
        replace(m, chi_z=3.1) if (m.area, m.layer) == ("left_hand", "deep") else m
        for m in scored.measurements))
    lines = findings(both)
    assert [line.split(":")[0] for line in lines] == [
        "FLAGGED  left hand deep", "beyond z (not the deep-layer finding)"]
    assert kos_reason(both).startswith("Deep-layer susceptibility beyond the norm: left hand")


# --- edge cases ------------------------------------------------------------------------------


def test_single_segment_seg_and_sr(study: Study, sim, tmp_path) -> None:
    """One region only: the SEG has one segment and the SR still references it (the highdicom
    trap: ReferencedSegment.from_segmentation fails on a single-segment SEG)."""
    require_tool("dsrdump", "dcmtk")
    m1 = m1_from_truth(sim, only=("right_foot", "middle"))
    ctx = BuildContext.create(study.loaded, source_reader(study.sources), VERSION)
    qsm_images = build_derived_mr(ctx, sim.truth.chi_ppm, QSM_MR)
    seg = build_segmentation(ctx, m1, reference=qsm_images)
    assert seg is not None and len(seg.SegmentSequence) == 1
    sr = build_report(ctx, m1, seg, regions_on=qsm_images)
    paths = save_all([seg, sr], tmp_path)
    for path in paths:
        assert not dciodvfy_errors(path), dciodvfy_errors(path)
    out = run(["dsrdump", str(paths[1])])
    assert out.returncode == 0
    assert out.stdout.count("Referenced Segment") == 1
    assert "Anatomy coverage incomplete" in out.stdout  # the other areas: not covered


def test_without_m1_or_r2star(study: Study, sim, tmp_path) -> None:
    datasets = build_derived(
        study.loaded, sim.truth.chi_ppm, None, None, source_reader(study.sources), VERSION
    )
    kinds = [ds.Modality for ds in datasets]
    assert kinds.count("MR") == sim.gre.shape[2] and "SEG" not in kinds and "SR" not in kinds
    key = [ds for ds in datasets if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"]
    assert len(key) == 1 and "middle slice" in key[0].ImageComments
    for path in save_all([datasets[0], key[0]], tmp_path):
        assert not dciodvfy_errors(path), dciodvfy_errors(path)


def test_the_memoised_iod_lookup_answers_as_highdicom_does() -> None:
    import highdicom._standard_utils as standard_utils
    import highdicom.base
    import highdicom.sr.content

    from qsmnode import compat

    compat.install()
    compat.install()  # idempotent
    for module in (standard_utils, highdicom.base, highdicom.sr.content):
        assert module.is_attribute_in_iod is compat.is_attribute_in_iod
    original = compat._highdicom_is_attribute_in_iod()
    assert original is not compat.is_attribute_in_iod
    classes = ["1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1",
               "1.2.840.10008.5.1.4.1.1.30", "1.2.840.10008.5.1.4.1.1.66.4",
               "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"]
    attributes = ["PixelData", "FloatPixelData", "NumberOfFrames", "ContentDate",
                  "ContentTime", "EchoTime", "SegmentSequence", "NotAnAttribute"]
    for sop_class in classes:
        for attribute in attributes:
            for exclude in (None, ["IconImageSequence"]):
                want = original(attribute, sop_class, exclude)
                assert compat.is_attribute_in_iod(attribute, sop_class, exclude) is want
    with pytest.raises(KeyError, match="No IOD found"):
        compat.is_attribute_in_iod("PixelData", "1.2.3.4")


def test_importing_the_derived_objects_leaves_highdicom_alone() -> None:
    """The memo is the start-up's to install (qsmnode.compat.install), not an import's."""
    code = ("import highdicom._standard_utils as s; f = s.is_attribute_in_iod; "
            "import highdicom.base, qsmnode.dicom.derived; "
            "assert s.is_attribute_in_iod is f and highdicom.base.is_attribute_in_iod is f")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_key_image_without_m1_says_why() -> None:
    from qsmnode.dicom.derived.key_images import BACKGROUND, render_summary

    chi = np.zeros((40, 30), dtype=np.float32)
    labels = np.zeros((40, 30), dtype=np.uint8)
    args = (chi, labels, (1.0, 1.0), ("R", "P"), "QSM", "slice 1/1")
    plain = render_summary(*args, m1=None)
    noted = render_summary(*args, m1=None, m1_note="registration to the MNI template failed: "
                           "the slab holds no cortex – nothing to register")
    assert plain.shape == noted.shape
    ink = [int((np.abs(img.astype(int) - BACKGROUND).sum(axis=-1) > 0).sum())
           for img in (plain, noted)]
    assert ink[1] > ink[0] + 500  # the reason is written below "M1 analysis not available"


def test_a_one_part_patient_name_is_not_quoted_in_warnings(sim, m1, tmp_path) -> None:
    """highdicom warns of a patient name of one component by quoting it; the warning (and so
    the node's log) must not carry it."""
    import warnings

    name = "ZQXPRIVATE"
    sources = write_dicom(sim.gre, tmp_path / "source", "siemens",
                          replace(SimStudyInfo(seed=7), patient_name=name))
    (loaded,) = load_folder(tmp_path / "source")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        datasets = build_derived(loaded, sim.truth.chi_ppm, sim.truth.r2star_per_s, m1,
                                 source_reader(sources), VERSION)
    assert {str(ds.PatientName) for ds in datasets} == {name}
    assert not [str(w.message) for w in caught if name in str(w.message)]


# --- sources with missing, empty or malformed optional data ------------------------------------

STRIPPED = ("AccessionNumber", "ReferringPhysicianName", "StudyID", "PatientBirthDate",
            "PatientSex", "SeriesDescription", "InstitutionName", "StudyDescription",
            "PatientName", "PatientID", "StudyDate", "StudyTime", "BodyPartExamined",
            "ProtocolName", "StationName", "PatientAge", "PatientWeight", "OperatorsName")
"""Type 2 and Type 3 attributes that real and anonymised exports leave out."""


def _build_and_validate(sources: list[Path], sim: Simulation, m1: M1Result, out: Path,
                        ) -> list[Dataset]:
    (loaded,) = load_folder(sources)
    assert isinstance(loaded, LoadedAcquisition), loaded
    datasets = build_derived(loaded, sim.truth.chi_ppm, sim.truth.r2star_per_s, m1,
                             source_reader(sources), VERSION)
    paths = save_all(datasets, out)
    failures = {p.name: dciodvfy_errors(p) for p in paths}
    assert not any(failures.values()), {n: e for n, e in failures.items() if e}
    return datasets


@pytest.mark.parametrize("style", STYLES)
def test_sources_without_optional_attributes_make_valid_objects(style: str, sim, m1,
                                                                 tmp_path) -> None:
    """An anonymised export without its Type 2/3 patient, study and series attributes: every
    object is built, carries the Type 2 ones empty, and passes dciodvfy."""
    require_tool("dciodvfy", "dicom3tools")
    sources = write_dicom(sim.gre, tmp_path / "source", style, SimStudyInfo(seed=7))
    for path in sources:
        ds = pydicom.dcmread(path)
        for keyword in STRIPPED:
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(path)
    datasets = _build_and_validate(sources, sim, m1, tmp_path / "derived")
    for ds in datasets:
        for keyword in ("AccessionNumber", "ReferringPhysicianName", "StudyID",
                        "PatientBirthDate", "PatientSex", "PatientName", "PatientID"):
            assert keyword in ds and not ds[keyword].value, (ds.Modality, keyword)


@pytest.mark.parametrize("keyword", STRIPPED)
def test_each_missing_attribute_alone_is_coped_with(keyword: str, sim, m1, tmp_path) -> None:
    """One attribute absent at a time (the loader and every builder, no exception)."""
    sources = write_dicom(sim.gre, tmp_path / "source", "siemens", SimStudyInfo(seed=7))
    for path in sources:
        ds = pydicom.dcmread(path)
        if keyword in ds:
            delattr(ds, keyword)
        ds.save_as(path)
    (loaded,) = load_folder(sources)
    assert isinstance(loaded, LoadedAcquisition), loaded
    datasets = build_derived(loaded, sim.truth.chi_ppm, sim.truth.r2star_per_s, m1,
                             source_reader(sources), VERSION)
    assert len(datasets) > 10


def test_empty_sequences_and_malformed_values_are_not_copied(sim, m1, tmp_path) -> None:
    """Philips' empty ProcedureCodeSequence, other empty or incomplete sequences and invalid
    Type 2 values in the source: left out (or empty) in the derived objects, dciodvfy clean."""
    require_tool("dciodvfy", "dicom3tools")
    sources = write_dicom(sim.gre, tmp_path / "source", "siemens", SimStudyInfo(seed=7))
    for path in sources:
        ds = pydicom.dcmread(path)
        ds.ProcedureCodeSequence = []
        ds.ReferencedStudySequence = []
        code = Dataset()
        code.CodeMeaning = "no code value"
        ds.AnatomicRegionSequence = [code]
        ds.PatientSex = "X"
        ds.StudyDate = "2022-07-11"
        ds.save_as(path)
    datasets = _build_and_validate(sources, sim, m1, tmp_path / "derived")
    for ds in datasets:
        assert "ProcedureCodeSequence" not in ds and "ReferencedStudySequence" not in ds
        assert ds.PatientSex == "" and ds.StudyDate == ""


def test_patient_values_malformed_for_their_vr_are_not_copied(sim, m1, tmp_path) -> None:
    """A person name of six components, one of 70 characters, an age of "45", a weight of
    "70kg" and a size of "1,75" in the source (as stored, raw): the Type 2 ones go empty, the
    others are left out, dciodvfy clean, and the log names the attributes, not the values."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    from qsmnode.dicom.derived.common import source_fixes

    require_tool("dciodvfy", "dicom3tools")
    sources = write_dicom(sim.gre, tmp_path / "source", "siemens", SimStudyInfo(seed=7))
    for path in sources:
        ds = pydicom.dcmread(path)
        ds.PatientName = "Aa^Bb^Cc^Dd^Ee^Ff"
        ds.ReferringPhysicianName = "X" * 70
        for tag, vr, value in ((0x00101010, "AS", b"45"), (0x00101030, "DS", b"70kg"),
                               (0x00101020, "DS", b"1,75")):
            ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
        ds.save_as(path)
    fixes = source_fixes(pydicom.dcmread(sources[0], stop_before_pixels=True))
    assert {"PatientName not a valid value (left empty)",
            "ReferringPhysicianName not a valid value (left empty)",
            "PatientAge not a valid value for its VR (left out)",
            "PatientWeight not a valid value for its VR (left out)",
            "PatientSize not a valid value for its VR (left out)"} <= set(fixes), fixes
    assert not any(v in " ".join(fixes) for v in ("Aa", "XXX", "45", "70kg", "1,75"))
    datasets = _build_and_validate(sources, sim, m1, tmp_path / "derived")
    for ds in datasets:
        assert ds.PatientName == "" and ds.ReferringPhysicianName == ""
        assert not any(k in ds for k in ("PatientAge", "PatientWeight", "PatientSize"))


_RAW_PATIENT_VALUES = (
    (0x00100010, "PN", b"Zqxdoe^Jane\x07"),  # PatientName with a control character
    (0x00080090, "PN", b"Zqxdr\x0bWho"),  # ReferringPhysicianName, one too
    (0x00101001, "PN", b"Zqxa^Zqxb\r\nZqxc"),  # OtherPatientNames across two lines
    (0x00101010, "AS", b"045Y "),  # PatientAge with its padding: stays, as 045Y
    (0x00081030, "LO", b"Zqxstudy\x1b[31m"),  # StudyDescription with a terminal escape
)
"""Raw source values (as a careless scanner stores them) that are not valid for their VR
but that pydicom reads without a word: control characters in names and text."""


@pytest.mark.parametrize(("tag", "vr", "raw", "fix"), [
    (0x00100010, "PN", b"Zqxdoe^Jane\x07", "PatientName not a valid value (left empty)"),
    (0x00100010, "PN", b"Zqxdoe^Jane\tX", "PatientName not a valid value (left empty)"),
    (0x00100010, "PN", b"Zqxa^B^C^D^E^F", "PatientName not a valid value (left empty)"),
    (0x00101010, "AS", b"45", "PatientAge not a valid value for its VR (left out)"),
    (0x00101010, "AS", b"abc ", "PatientAge not a valid value for its VR (left out)"),
    (0x00101010, "AS", b"045y", "PatientAge not a valid value for its VR (left out)"),
    (0x00101010, "AS", b"045Y ", None),
    (0x00100020, "LO", b"Zqx\x01Qzid", "PatientID not a valid value (left empty)"),
    (0x00081030, "LO", b"Zqxstudy\x1b[31m",
     "StudyDescription not a valid value for its VR (left out)"),
])
def test_patient_values_with_control_characters_or_bad_forms_are_tidied(
        tag: int, vr: str, raw: bytes, fix: str | None, caplog) -> None:
    """Each bad PN, AS or LO form in the source: named by attribute in the header check (and
    its log line), never by value, and the tidied header holds only values valid for their
    VR; a value valid once its padding is stripped ("045Y ") is kept."""
    import logging
    from types import SimpleNamespace

    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    from qsmnode.dicom.derived.common import tidy_source
    from qsmnode.pipeline import check_source_header

    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.StudyDate = "Plain^Name", "P1", "20220711"
    ds[tag] = RawDataElement(Tag(tag), vr, len(raw), raw, 0, False, True)
    keyword = pydicom.datadict.keyword_for_tag(tag)
    with caplog.at_level(logging.INFO, logger="qsmnode"):
        fixes = check_source_header(SimpleNamespace(header=ds, series_numbers=(5,)))
    assert (fix in fixes) if fix else not any(f.startswith(keyword) for f in fixes), fixes
    stored = raw.decode("latin-1")
    words = {w for w in re.split(r"[\^\s\x00-\x1f]+", stored) if len(w) >= 2}
    text = " ".join(fixes) + caplog.text
    assert not [w for w in words if w in text and w != "Y"], text
    tidied = tidy_source(ds)
    if fix is None:
        assert tidied[tag].value == stored.strip()
    elif "(left empty)" in fix:
        assert tidied[tag].value in ("", None)
    else:
        assert tag not in tidied


def test_control_characters_in_patient_values_are_not_copied(sim, m1, tmp_path) -> None:
    """Names and a study description with control characters, and a padded age, in the
    source: every derived object passes dciodvfy and holds none of those values; the age
    is copied as 045Y."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    require_tool("dciodvfy", "dicom3tools")
    sources = write_dicom(sim.gre, tmp_path / "source", "siemens", SimStudyInfo(seed=7))
    for path in sources:
        ds = pydicom.dcmread(path)
        for tag, vr, value in _RAW_PATIENT_VALUES:
            ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
        ds.save_as(path)
    datasets = _build_and_validate(sources, sim, m1, tmp_path / "derived")
    for ds in datasets:
        assert ds.PatientName == "" and ds.ReferringPhysicianName == ""
        assert "OtherPatientNames" not in ds and "Zqx" not in str(ds.get("StudyDescription"))
        assert ds.get("PatientAge", "045Y") == "045Y"


@pytest.mark.parametrize("form", ["classic", "enhanced"])
def test_real_philips_sources_make_valid_objects(form: str, shared_data: Path,
                                                 tmp_path: Path) -> None:
    """The real Philips sample (classic: an empty ProcedureCodeSequence in every file;
    Enhanced: an empty AcquisitionContextSequence): maps, MR images, SEG, SR and key images
    pass dciodvfy."""
    require_tool("dciodvfy", "dicom3tools")
    folder = shared_data / "philips-3t-2echo" / form
    sources = sorted(folder.iterdir())
    empty = "ProcedureCodeSequence" if form == "classic" else "AcquisitionContextSequence"
    assert len(pydicom.dcmread(sources[0], stop_before_pixels=True)[empty].value) == 0
    (loaded,) = load_folder(folder)
    assert isinstance(loaded, LoadedAcquisition), loaded
    rng = np.random.default_rng(3)
    chi = rng.normal(0.0, 0.02, loaded.gre.shape).astype(np.float32)
    r2s = rng.uniform(10.0, 40.0, loaded.gre.shape).astype(np.float32)
    datasets = build_derived(loaded, chi, r2s, m1_blocks(loaded.gre.shape, chi),
                             source_reader(sources), VERSION)
    assert {ds.Modality for ds in datasets} == {"MR", "SEG", "SR", "OT", "KO"}
    paths = save_all(datasets, tmp_path / "derived")
    failures = {p.name: dciodvfy_errors(p) for p in paths}
    assert not any(failures.values()), {n: e for n, e in failures.items() if e}


def test_a_rejected_registration_is_reported_by_its_failing_check(study: Study, sim,
                                                                  tmp_path) -> None:
    """The SR of a registration rejected for mask_in_template names that check and its
    threshold as failing, and the NMI as passing (the key image prints the same flag texts)."""
    import SimpleITK as sitk

    from qsmnode.m1.analysis import registration_flags
    from qsmnode.m1.register import Registration

    require_tool("dsrdump", "dcmtk")
    flags = registration_flags(Registration(sitk.Euler3DTransform(), 1.081, 0.85, -0.5, 0.0),
                               through_t1w=False)
    m1 = replace(m1_from_truth(sim), flags=flags)
    ctx = BuildContext.create(study.loaded, source_reader(study.sources), VERSION)
    qsm_images = build_derived_mr(ctx, sim.truth.chi_ppm, QSM_MR)
    seg = build_segmentation(ctx, m1, reference=qsm_images)
    [path] = save_all([build_report(ctx, m1, seg)], tmp_path)
    assert not dciodvfy_errors(path), dciodvfy_errors(path)
    out = run(["dsrdump", str(path)]).stdout
    failing = [line for line in out.splitlines() if "registration_mask" in line]
    assert any("mask_in_template 0.850 < 0.9" in line for line in failing), failing
    assert "Usable - Does not meet the quality control standard" in out
    assert "normalised mutual information 1.081 >= 1.07" in out


# --- what a viewer needs (OHIF 3: tests/test_viewer_ohif.py) -------------------------------


def _frame_geometry(ds: Dataset) -> tuple[list[str], dict[str, list[str]]]:
    """ImageOrientationPatient and each frame's ImagePositionPatient, as the file's strings."""
    shared = ds.SharedFunctionalGroupsSequence[0]
    orientation = [str(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    positions = {}
    for frame in ds.PerFrameFunctionalGroupsSequence:
        ipp = [str(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        positions["\\".join(ipp)] = ipp
    return orientation, positions


def test_maps_and_seg_reference_their_single_volume_series_with_identical_strings(
    study: Study,
) -> None:
    """A viewer overlays a PM or SEG on the series its Referenced Series Sequence names first:
    that is the derived MR series (one volume), not the multi-echo source; and Cornerstone3D
    places it only when the orientation strings are identical."""
    objects = study.objects
    pairs = [(objects.qsm_map, objects.qsm_images), (objects.r2star_map, objects.r2star_images),
             (objects.segmentation, objects.qsm_images)]
    for derived, images in pairs:
        assert derived is not None
        ds = pydicom.dcmread(study.out / file_name(derived))
        mr = [study.read(image) for image in images]
        assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == mr[0].SeriesInstanceUID
        assert {i.ReferencedSOPInstanceUID
                for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == {
            m.SOPInstanceUID for m in mr}
        echo1 = {row[0].sop_instance_uid for row in study.loaded.magnitude_sources}
        referenced = {i.ReferencedSOPInstanceUID for s in ds.ReferencedSeriesSequence
                      for i in s.ReferencedInstanceSequence}
        assert echo1 <= referenced  # the acquired images stay further sources
        orientation, positions = _frame_geometry(ds)
        mr_positions = {"\\".join(str(v) for v in m.ImagePositionPatient) for m in mr}
        for m in mr:
            assert [str(v) for v in m.ImageOrientationPatient] == orientation
        assert set(positions) <= mr_positions
        spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        assert [str(v) for v in spacing] == [str(v) for v in mr[0].PixelSpacing]


def test_sr_gives_every_region_a_rectangle_on_a_qsm_image(study: Study, m1: M1Result) -> None:
    """Each region (and the quality control) has a TID 1410 group with the tracking UID of its
    volumetric or TID 1501 group and a closed 5-point POLYLINE on a QSM derived MR image: what
    OHIF needs to show an SR's measurements."""
    sr = study.read(study.objects.report)
    qsm = {ds.SOPInstanceUID: k for k, ds in enumerate(study.objects.qsm_images)}
    [container] = [g for g in sr.ContentSequence
                   if g.ConceptNameCodeSequence[0].CodeValue == "126010"]
    by_uid: dict[str, list[Dataset]] = {}
    for group in container.ContentSequence:
        uid = next(c.UID for c in group.ContentSequence if c.ValueType == "UIDREF")
        by_uid.setdefault(uid, []).append(group)
    labels = np.asarray(m1.labels)
    regions = 0
    for uid, groups in by_uid.items():
        coords = [c for g in groups for c in g.ContentSequence if c.ValueType == "SCOORD"]
        name = next(c.TextValue for c in groups[0].ContentSequence if c.ValueType == "TEXT")
        # quality control: its checks, the acquisition protocol and the outline
        assert len(groups) == (3 if name == "Quality control" else 2), uid
        assert len(coords) == 1, uid
        scoord = coords[0]
        assert scoord.GraphicType == "POLYLINE"
        points = np.asarray(scoord.GraphicData, dtype=float).reshape(-1, 2)
        assert len(points) == 5 and np.array_equal(points[0], points[-1])
        [image] = [c for c in scoord.ContentSequence if c.ValueType == "IMAGE"]
        k = qsm[image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID]
        if name == "Quality control":
            continue
        regions += 1
        area = next(a for a in AREAS if segment_name(a, "deep").rsplit(" ", 1)[0] in name)
        layers = LAYERS if name.endswith("all layers") else [name.rsplit(" ", 1)[1]]
        mask = np.isin(labels[:, :, k], [segment_label(area, x) for x in layers])
        assert mask.sum() == np.isin(labels, [segment_label(area, x) for x in layers]).sum(
            axis=(0, 1)).max()  # the slice holding most of the region
        rows, cols = np.nonzero(mask.T)  # pixel matrix = [j, i]
        x0, y0 = points.min(axis=0)
        x1, y1 = points.max(axis=0)
        assert (x0, y0, x1, y1) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    assert regions == 16


def test_without_qsm_r2star_takes_its_place_and_every_object_says_why(
    sim: Simulation, m1: M1Result, tmp_path: Path
) -> None:
    """QSM not computed (a 2-D protocol with slice gaps, issue 13 item 4): no QSM objects; the
    R2* maps, the SEG and the SR (regions drawn on the R2* images, no χ items) are there, with
    the M1 result's failed ``qsm_computed`` flag; the key images show R2* and say why, and so
    does the KOS; every object passes dciodvfy."""
    from qsmnode.m1.result import QualityFlag

    why = "QSM was not computed: the slices have gaps (test)"
    no_chi = replace(
        m1, flags=(*m1.flags, QualityFlag("qsm_computed", False, None, why)),
        measurements=tuple(replace(x, chi_mean_ppm=math.nan, chi_sd_ppm=math.nan,
                                               chi_median_ppm=math.nan, chi_z=None)
                           for x in m1.measurements))
    sources = write_dicom(sim.gre, tmp_path / "source", "enhanced", SimStudyInfo(seed=7))
    (loaded,) = load_folder(tmp_path / "source")
    nan = np.full(sim.truth.chi_ppm.shape, np.nan, dtype=np.float32)
    objects = build_derived_objects(loaded, nan, sim.truth.r2star_per_s, no_chi,
                                    source_reader(sources), VERSION, qsm_note=why)
    assert objects.qsm_map is None and not objects.qsm_images
    assert objects.r2star_map is not None and len(objects.r2star_images) == sim.gre.shape[2]
    assert objects.segmentation is not None and objects.report is not None
    r2star_uids = {ds.SOPInstanceUID for ds in objects.r2star_images}
    seg_refs = {ref.ReferencedSOPInstanceUID
                for ref in objects.segmentation.ReferencedSeriesSequence[0]
                .ReferencedInstanceSequence}
    assert seg_refs <= r2star_uids
    report = str(objects.report)
    assert "qsm_computed: QSM was not computed: the slices have gaps" in report
    assert "magnetic susceptibility" not in report.lower()  # χ items are left out (NaN)
    assert objects.key_images and all(
        ds.ImageComments.startswith("R2* through the ") and why in ds.ImageComments
        for ds in objects.key_images)
    assert objects.key_objects is not None
    (reason,) = [item.TextValue for item in objects.key_objects.ContentSequence
                 if item.ConceptNameCodeSequence[0].CodeValue == "113012"]  # its description
    assert reason == f"{why}; R2* maps and the M1 T2* signal and thickness for review"
    require_tool("dciodvfy", "dicom3tools")
    for path in save_all(objects.datasets, tmp_path / "derived"):
        assert dciodvfy_errors(path) == [], path.name
