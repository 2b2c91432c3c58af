"""The Key Object Selection of an acquisition: in the source study, titled "Of Interest",
referencing the key images, the SR and the SEG, with the finding as its reason; dciodvfy
clean (also covered, with every other object, by tests/test_derived.py)."""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from qsmnode.dicom.derived import build_derived_objects, source_reader
from qsmnode.dicom.derived.kos import kos_reason
from qsmnode.dicom.load import load_folder
from tests.conftest import require_tool
from tests.derivedutil import dciodvfy_errors, m1_from_truth
from tests.nodeutil import small_simulation, write_study


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("kos")
    files = write_study(folder / "source", "siemens", 17)
    (loaded,) = load_folder(folder / "source")
    sim = small_simulation()
    return folder, build_derived_objects(loaded, sim.truth.chi_ppm, sim.truth.r2star_per_s,
                                         m1_from_truth(sim), source_reader(files), "kos-test")


def _referenced(ds: pydicom.Dataset) -> set[str]:
    return {item.ReferencedSOPInstanceUID
            for study in ds.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for item in series.ReferencedSOPSequence}


def test_the_kos_flags_the_key_images_sr_and_seg(objects) -> None:  # type: ignore[no-untyped-def]
    folder, o = objects
    kos = o.key_objects
    assert kos is not None and kos is o.datasets[-1]
    assert kos.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59" and kos.Modality == "KO"
    assert kos.StudyInstanceUID == o.report.StudyInstanceUID
    assert kos.PatientID == o.report.PatientID
    assert int(kos.SeriesNumber) == 508
    wanted = {ds.SOPInstanceUID for ds in (*o.key_images, o.report, o.segmentation)}
    assert _referenced(kos) == wanted
    title = kos.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "113000", "DCM", "Of Interest")
    texts = [item.TextValue for item in kos.ContentSequence
             if item.ConceptNameCodeSequence[0].CodeValue == "113012"]  # Key Object Description
    assert texts == [kos_reason(m1_from_truth(small_simulation()))]
    require_tool("dciodvfy", "dicom3tools")
    path = folder / "kos.dcm"
    kos.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []


def test_the_reason_is_the_deep_layer_finding() -> None:
    m1 = m1_from_truth(small_simulation())
    unscored = dataclasses.replace(m1, measurements=tuple(
        dataclasses.replace(m, chi_z=None) for m in m1.measurements))
    assert "no normative table" in kos_reason(unscored)
    scored = dataclasses.replace(m1, measurements=tuple(
        dataclasses.replace(m, chi_z=3.2 if (m.area, m.layer) == ("right_foot", "deep")
                            else 0.4) for m in m1.measurements))
    assert kos_reason(scored) == ("Deep-layer susceptibility beyond the norm: right foot area "
                                  "raised (z 3.2)")
    assert "within z +/-4" in kos_reason(scored, z_high=4.0)
    assert kos_reason(None, "the M1 analysis is turned off") == (
        "QSM maps for review; no M1 analysis: the M1 analysis is turned off")


def test_the_reason_adds_the_changes_beyond_test_retest_since_the_prior() -> None:
    import datetime as dt

    from qsmnode.m1.followup import Change, FollowUp, PriorResult

    m1 = m1_from_truth(small_simulation())
    prior = PriorResult("1.2.1", dt.date(2025, 6, 5), "1.2.9", "1.2.8", "1.2.3", "v", None, {})
    changes = (Change("left_hand", "deep", "chi_mean_ppm", 0.025, 0.036, 0.011, 0.011, 0.01,
                      True),
               Change("right_hand", "deep", "chi_mean_ppm", 0.017, 0.017, 0.0, 0.0, 0.01,
                      False),
               Change("left_hand", "all", "thickness_mean_mm", 2.8, 2.4, -0.4, -0.4, 0.25,
                      True))
    follow = FollowUp(prior, changes, (prior,), (), "compared", 1.0, dt.date(2026, 6, 5))
    assert kos_reason(m1, follow_up=follow) == kos_reason(m1) + (
        "; changed beyond test-retest since 2025-06-05: left hand area deep chi +0.0110 ppm; "
        "left hand area thickness -0.40 mm")
    nothing = FollowUp(None, (), (), (), "no earlier result")
    assert kos_reason(m1, follow_up=nothing) == kos_reason(m1)


def test_the_kos_is_the_same_for_the_same_input(objects) -> None:  # type: ignore[no-untyped-def]
    folder, o = objects
    (loaded,) = load_folder(folder / "source")
    sim = small_simulation()
    files = sorted(str(p) for p in (folder / "source").rglob("*") if p.is_file())
    again = build_derived_objects(loaded, sim.truth.chi_ppm, sim.truth.r2star_per_s,
                                  m1_from_truth(sim), source_reader(files), "kos-test")
    assert again.key_objects.SOPInstanceUID == o.key_objects.SOPInstanceUID
    assert again.key_objects.SeriesInstanceUID == o.key_objects.SeriesInstanceUID


def _right_foot_at(m1, z: float):  # type: ignore[no-untyped-def]
    return dataclasses.replace(m1, measurements=tuple(
        dataclasses.replace(m, chi_z=z if (m.area, m.layer) == ("right_foot", "deep")
                            else 0.4) for m in m1.measurements))


def test_the_sites_z_flag_sets_the_finding_of_the_kos_and_key_images(  # type: ignore[no-untyped-def]
        objects) -> None:
    """``[pipeline] z_flag`` through build_derived_objects: z 2.5 is the finding at the default
    2 and not at 3, in the KOS and on the key images alike."""
    from qsmnode.dicom.derived.key_images import WARN

    folder, _ = objects
    (loaded,) = load_folder(folder / "source")
    sim = small_simulation()
    files = sorted(str(p) for p in (folder / "source").rglob("*") if p.is_file())
    m1 = _right_foot_at(m1_from_truth(sim), 2.5)
    assert m1.measurement("right_foot", "deep").covered

    def build(**kwargs: Any):  # type: ignore[no-untyped-def]
        return build_derived_objects(loaded, sim.truth.chi_ppm, sim.truth.r2star_per_s, m1,
                                     source_reader(files), "kos-test", **kwargs)

    def reason(o) -> str:  # type: ignore[no-untyped-def]
        (text,) = [item.TextValue for item in o.key_objects.ContentSequence
                   if item.ConceptNameCodeSequence[0].CodeValue == "113012"]
        return str(text)

    def warned(o) -> int:  # type: ignore[no-untyped-def]
        return sum(int((np.abs(ds.pixel_array.astype(int) - WARN).sum(axis=-1) == 0).sum())
                   for ds in o.key_images)

    default, strict = build(), build(z_flag=3.0)
    assert reason(default) == ("Deep-layer susceptibility beyond the norm: right foot area "
                               "raised (z 2.5)")
    assert reason(strict).startswith("QSM and M1 results for review; deep-layer "
                                     "susceptibility within z +/-3 in the ")
    assert warned(default) > warned(strict) + 200  # the flagged row, on each key image


def test_the_pipeline_z_flag_setting_reaches_the_builders(monkeypatch: Any) -> None:
    """The job's ``z_flag`` goes into the pipeline's parameters, and from them to the builders."""
    import qsmnode.pipeline as pipeline_module
    from qsmnode.node.jobs import JobSpec, process_acquisition
    from qsmnode.pipeline import PipelineParams

    seen: list[Any] = []

    class Result:
        datasets: tuple[Any, ...] = ()

        def to_json(self) -> dict[str, Any]:
            return {}

    monkeypatch.setattr(pipeline_module, "run_pipeline",
                        lambda loaded, params, progress=None: seen.append(params) or Result())
    process_acquisition(object(), [], True, False, "hcpex", None, None, 3.0)
    process_acquisition(object(), [], True, False, "hcpex")
    assert [params.z_flag for params in seen] == [3.0, 2.0]

    built: list[dict[str, Any]] = []
    monkeypatch.setattr(pipeline_module, "build_derived",
                        lambda *args, **kwargs: built.append(kwargs) or [])
    ctx = types.SimpleNamespace(
        loaded=None, qsm=types.SimpleNamespace(chi_ppm=None, r2star_per_s=None), m1=None,
        m1_record={}, datasets=(), follow_up=None, qsm_not_computed="",
        params=PipelineParams(source_files=(Path("x.dcm"),), z_flag=3.0))
    pipeline_module._derived(ctx)  # type: ignore[arg-type]
    assert built[0]["z_flag"] == 3.0
    spec = JobSpec(1, 1, 1, "1.2", ("1.2.1",), ("a.dcm",), 2, True, "w", z_flag=3.0)
    assert JobSpec.from_json(spec.to_json()).z_flag == 3.0
    assert JobSpec.from_json(spec.to_json().replace(', "z_flag": 3.0', "")).z_flag == 2.0
