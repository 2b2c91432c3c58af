"""The pipeline, the one way to process an acquisition: QSM, M1 analysis, derived objects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qsmnode.dicom.load import LoadedAcquisition, load_folder
from qsmnode.dicom.templates import load_m1_atlas
from qsmnode.pipeline import PipelineError, PipelineParams, run_pipeline
from qsmnode.sim.phantom import PhantomParams
from qsmnode.sim.scanner import preset, simulate
from qsmnode.sim.vendor_dicom import SimStudyInfo, write_dicom


def _one(folder: Path | list[Path]) -> LoadedAcquisition:
    found = load_folder(folder)
    assert len(found) == 1 and isinstance(found[0], LoadedAcquisition), found
    return found[0]


def test_a_single_slice_is_refused_with_the_reason(shared_data: Path) -> None:
    siemens = shared_data / "siemens-3t-megre-1slice"
    loaded = _one([siemens / "mag", siemens / "phase"])
    with pytest.raises(PipelineError, match="QSM needs a 3-D volume: this acquisition is"):
        run_pipeline(loaded)
    # Loading and checking alone still work.
    result = run_pipeline(loaded, PipelineParams(qsm=False))
    assert [s.name for s in result.stages] == ["check", "qsm", "m1", "derived"]
    assert result.acquisition.n_echoes == 3 and not result.datasets


def test_real_philips_data_runs_end_to_end(shared_data: Path) -> None:
    folder = shared_data / "philips-3t-2echo" / "classic"
    loaded = _one(folder)
    files = tuple(sorted(folder.iterdir()))
    result = run_pipeline(loaded, PipelineParams(source_files=files))
    modalities = sorted({ds.Modality for ds in result.datasets})
    assert modalities == ["KO", "MR", "OT"]  # maps, key images, KOS; no M1 without an atlas
    assert result.qsm_quality["mask_fraction"] > 0.1
    assert result.to_json()["derived_objects"] == len(result.datasets)


@pytest.mark.slow
def test_simulated_study_gives_maps_segmentation_and_report(tmp_path: Path) -> None:
    sim = simulate(preset("tiny", seed=2), PhantomParams(als_delta_chi_ppm={"left_hand": 0.03}))
    files = write_dicom(sim.gre, tmp_path, "enhanced", SimStudyInfo(seed=2))
    loaded = _one(tmp_path)
    result = run_pipeline(loaded, PipelineParams(source_files=tuple(files),
                                                 m1_atlas=load_m1_atlas()))
    assert "error" not in result.m1, result.m1
    assert len(result.m1["measurements"]) == 16  # 4 areas × (3 layers + all)
    sop_classes = {ds.SOPClassUID.name for ds in result.datasets}
    assert {"Parametric Map Storage", "Comprehensive 3D SR Storage",
            "Secondary Capture Image Storage", "MR Image Storage"} <= sop_classes
    record = result.to_json()
    assert record["derived_objects"] == len(result.datasets)
    assert np.isfinite(record["qsm_quality"]["mask_fraction"])


@pytest.mark.parametrize("style", ["siemens", "enhanced"])
def test_slices_with_gaps_are_not_given_to_qsm(style: str, tmp_path: Path) -> None:
    """A 2-D protocol with a slice gap (slices 3 mm apart, 1.5 mm thick): QSM is not computed,
    and the reason says why; the same slices without the gap go through."""
    import pydicom

    scan = preset("tiny", shape=(24, 28, 12), voxel_size_mm=(3.0, 3.0, 3.0),
                  echo_times_s=(0.005, 0.0105))
    sim = simulate(scan)
    files = write_dicom(sim.gre, tmp_path, style, SimStudyInfo(seed=3))
    contiguous = _one(tmp_path)
    assert run_pipeline(contiguous).qsm_quality["mask_fraction"] > 0
    for path in files:
        ds = pydicom.dcmread(path)
        if style == "enhanced":
            ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness = 1.5
        else:
            ds.SliceThickness = 1.5
        ds.save_as(path)
    gapped = _one(tmp_path)
    with pytest.raises(PipelineError, match=r"QSM needs contiguous slices: these are 3 mm "
                                            r"apart but 1.5 mm thick .*QSM was not computed"):
        run_pipeline(gapped)


def test_a_flat_qsm_result_fails_the_job_once_and_nothing_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A phase that carries no field (zero everywhere but one corner voxel, so it passes the
    load-time check for a constant phase) gives a χ map with no contrast: the plausibility
    gate after QSM stops the job with a final reason naming the series, the measured range
    and the floor, before any derived object is built."""
    import dataclasses

    import qsmnode.pipeline as pipeline_module
    from qsmnode.node.jobs import JobError, process_acquisition
    from qsmnode.qsm.quality import CHI_RANGE_FLOOR_PPM

    gre = simulate(preset("tiny", seed=4)).gre
    phase = np.zeros_like(gre.phase)
    phase[0, 0, 0, :] = 0.5
    files = write_dicom(dataclasses.replace(gre, phase=phase), tmp_path / "in", "siemens",
                        SimStudyInfo(seed=4))
    loaded = _one(tmp_path / "in")  # the load-time gates let it through
    built: list[object] = []
    monkeypatch.setattr(pipeline_module, "build_derived",
                        lambda *args, **kwargs: built.append(args) or [])
    out = tmp_path / "out"
    with pytest.raises(JobError) as caught:
        process_acquisition(loaded, [str(f) for f in files], out, m1=False)
    error = caught.value
    assert not error.transient  # an input problem: not retried
    text = str(error)
    assert text.startswith("series 5, 6: implausibly flat result: the susceptibility (χ) "
                           "map inside the χ mask spans 0 ppm")
    assert f"below the plausibility floor of {CHI_RANGE_FLOOR_PPM:g} ppm" in text
    assert "not delivered" in text
    assert "SIM^PHANTOM" not in text and "QSMNODE-SIM" not in text  # no patient data
    assert not built and not any(out.rglob("*"))

    # the same simulation with its own phase: the ranges are recorded and it goes through
    write_dicom(gre, tmp_path / "normal", "siemens", SimStudyInfo(seed=4))
    ranges = run_pipeline(_one(tmp_path / "normal")).qsm_quality["map_ranges_ppm"]
    assert ranges["chi"]["p99"] - ranges["chi"]["p1"] > 2 * CHI_RANGE_FLOOR_PPM
    assert ranges["chi"]["floor"] == CHI_RANGE_FLOOR_PPM
