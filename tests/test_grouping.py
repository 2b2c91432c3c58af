"""Grouping of header summaries into acquisitions
(:func:`qsmnode.dicom.grouping.group_acquisitions`) on edge cases, with small synthetic header
summaries (no pixels, no files), and the tracker's grouping of studies from store records with
a controlled clock."""

from __future__ import annotations

from pathlib import Path

from qsmnode.dicom.grouping import AcquisitionPlan, Problem, group_acquisitions
from qsmnode.dicom.headers import FrameInfo, InstanceInfo, Part, Vendor
from qsmnode.node.store import Store
from qsmnode.node.tracker import Tracker
from tests.nodeutil import MR, Clock, add, settings_for

M, P = Part.MAGNITUDE, Part.PHASE


def instance(number: int, part: Part, te_ms: float | None, z: float, *,
             study: str = "1.2.3", description: str = "gre_me") -> InstanceInfo:
    """One classic image of series ``number`` (series UID ``S<number>``), 4 × 4 pixels of
    1 mm, axial, at height ``z`` (mm)."""
    frame = FrameInfo(
        frame_number=None, echo_time_s=None if te_ms is None else te_ms / 1000,
        echo_number=None, part=part, position=(-10.0, -20.0, z),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), pixel_spacing=(1.0, 1.0), slice_spacing=2.0,
        rescale_slope=None, rescale_intercept=None, rescale_type=None, units=None)
    return InstanceInfo(
        path=None, sop_class_uid=MR,
        sop_instance_uid=f"9.{number}.{part.value}.{te_ms}.{z}", study_uid=study,
        series_uid=f"S{number}", frame_of_reference_uid="1.2.9", series_number=number,
        series_description=description, manufacturer="SIEMENS", vendor=Vendor.SIEMENS,
        enhanced=False, derived=False,
        image_type=("ORIGINAL", "PRIMARY", "M" if part is M else "P"), sequence_name="*fl3d6",
        rows=4, columns=4, images_in_acquisition=None, field_strength_t=7.0,
        phase_difference=False, frames=(frame,))


def series(number: int, part: Part, tes_ms: list[float | None],
           heights: list[float] | None = None, **kw: str) -> list[InstanceInfo]:
    heights = heights if heights is not None else [2.0 * k for k in range(5)]
    return [instance(number, part, te, z, **kw) for te in tes_ms for z in heights]


def plans(results: list) -> list[AcquisitionPlan]:
    return [r for r in results if isinstance(r, AcquisitionPlan)]


def problems(results: list) -> list[str]:
    return [r.reason for r in results if isinstance(r, Problem)]


# ---------------------------------------------------------------------------------------------
# two protocols with the same geometry in one study


def test_two_protocols_with_different_echo_trains_are_not_merged() -> None:
    """Series 5, 6 (3 echoes) and 7, 8 (4 other echoes), same geometry: two acquisitions, not
    one of 7 interleaved echoes."""
    a, b = [5.0, 10.0, 15.0], [4.0, 8.0, 12.0, 16.0]
    results = group_acquisitions(series(5, M, a) + series(6, P, a) + series(7, M, b)
                                 + series(8, P, b))
    assert not problems(results)
    found = [(p.series_numbers, p.n_echoes) for p in plans(results)]
    assert found == [((5, 6), 3), ((7, 8), 4)]


def test_a_single_echo_scan_after_a_multi_echo_scan_is_not_an_extra_echo() -> None:
    a = [5.0, 10.0, 15.0]
    results = group_acquisitions(series(5, M, a) + series(6, P, a) + series(7, M, [20.0])
                                 + series(8, P, [20.0]))
    [plan] = plans(results)
    assert plan.series_numbers == (5, 6) and plan.n_echoes == 3
    [reason] = problems(results)
    assert "series 7, 8" in reason and "1 echo, the rule needs at least 2" in reason


def test_phase_series_with_other_echo_times_is_still_reported_as_mismatched() -> None:
    results = group_acquisitions(series(5, M, [5.0, 10.0]) + series(6, P, [6.0, 11.0]))
    [reason] = problems(results)
    assert "mismatched echo times" in reason and "series 5, 6" in reason
    assert "mixed geometry" not in reason


def test_per_echo_series_still_join() -> None:
    """Siemens XA style: one series per echo and part (single echo time each)."""
    infos = []
    for e, te in enumerate([5.0, 10.0, 15.0]):
        infos += series(5 + e, M, [te]) + series(8 + e, P, [te])
    [plan] = group_acquisitions(infos)
    assert isinstance(plan, AcquisitionPlan)
    assert plan.series_numbers == (5, 6, 7, 8, 9, 10) and plan.n_echoes == 3


# ---------------------------------------------------------------------------------------------
# odd values


def test_positions_rounding_differently_between_series_are_one_slice() -> None:
    """Slice heights at x.xx5 mm (0.75 mm steps from 12.125) written with a 1e-6 mm difference
    in the phase series: the same slices, not 'mixed geometry'."""
    heights = [12.125 + 0.75 * k for k in range(5)]
    shifted = [z + 1e-6 for z in heights]
    results = group_acquisitions(series(5, M, [5.0, 10.0], heights)
                                 + series(6, P, [5.0, 10.0], shifted))
    assert not problems(results), problems(results)
    [plan] = plans(results)
    assert plan.n_slices == 5


def test_positions_rounding_differently_between_per_echo_series_are_one_slice() -> None:
    heights = [12.125 + 0.75 * k for k in range(5)]
    shifted = [z - 1e-6 for z in heights]
    infos = (series(5, M, [5.0], heights) + series(6, P, [5.0], heights)
             + series(7, M, [10.0], shifted) + series(8, P, [10.0], shifted))
    results = group_acquisitions(infos)
    assert not problems(results), problems(results)
    [plan] = plans(results)
    assert plan.n_slices == 5 and plan.n_echoes == 2


def test_an_echo_time_of_zero_or_less_is_a_problem() -> None:
    for first in (0.0, -5.0):
        results = group_acquisitions(series(5, M, [first, 10.0]) + series(6, P, [first, 10.0]))
        assert not plans(results)
        [reason] = problems(results)
        assert "echo time" in reason and "0 or less" in reason


# ---------------------------------------------------------------------------------------------
# the tracker


def test_a_series_uid_shared_with_another_study_does_not_block_grouping(tmp_path: Path) -> None:
    """An instance of a series already recorded under study A, labelled with study B (a broken
    sender): study A is still grouped, once."""
    clock = Clock(1000.0)
    with Store.in_state_dir(tmp_path) as store:
        tracker = Tracker(settings_for(tmp_path), store, clock=clock)
        for n in range(3):
            add(store, f"1.1.{n}", "9.1", 1000.0, study="1.2.A")
        add(store, "1.1.x", "9.1", 1000.0, study="1.2.B")
        clock.now = 1010.0
        tracker.poll()  # completes; the spool files do not exist: unreadable-file problems
        clock.now = 1011.0
        result = tracker.poll()
        assert not store.studies_ready(), result
        assert store.problems()


def test_not_a_number_or_infinite_values_are_problems_not_tracebacks() -> None:
    """DS values 'NaN' or 'inf' read as floats: a clear problem, never an exception."""
    import math
    from dataclasses import replace

    def broken(**frame: object) -> list[InstanceInfo]:
        infos = series(5, M, [5.0, 10.0]) + series(6, P, [5.0, 10.0])
        first = infos[0]
        infos[0] = replace(first, frames=(replace(first.frames[0], **frame),))
        return infos

    for te in (math.nan, math.inf):
        reasons = problems(group_acquisitions(broken(echo_time_s=te)))
        assert any("1 image without an echo time" in r for r in reasons), reasons
    for position in ((math.nan, 0.0, 0.0), (0.0, math.inf, 0.0)):
        reasons = problems(group_acquisitions(broken(position=position)))
        assert any("without image plane geometry" in r for r in reasons), reasons
    for spacing in ((0.0, 0.0), (math.nan, 1.0)):
        infos = [replace(i, frames=(replace(i.frames[0], pixel_spacing=spacing),))
                 for i in series(5, M, [5.0, 10.0]) + series(6, P, [5.0, 10.0])]
        results = group_acquisitions(infos)
        assert not plans(results)
        assert all("without image plane geometry" in r for r in problems(results))


def test_a_study_whose_grouping_fails_does_not_block_the_others(
        tmp_path: Path, monkeypatch) -> None:
    import qsmnode.node.tracker as tracker_module

    real = tracker_module.group_acquisitions

    def failing(infos, **kw):  # type: ignore[no-untyped-def]
        if any(i.study_uid == "1.2.A" for i in infos):
            raise ValueError("cannot convert float NaN to integer")
        return real(infos, **kw)

    monkeypatch.setattr(tracker_module, "group_acquisitions", failing)
    monkeypatch.setattr(tracker_module, "summarize", lambda path: instance(
        5, M, 5.0, 0.0, study="1.2.A" if "1.2.A" in str(path) else "1.2.B"))
    clock = Clock(1000.0)
    with Store.in_state_dir(tmp_path) as store:
        tracker = Tracker(settings_for(tmp_path), store, clock=clock)
        add(store, "1.1.0", "9.1", 1000.0, study="1.2.A")  # first in line
        add(store, "1.1.1", "9.2", 1000.5, study="1.2.B")
        clock.now = 1010.0
        result = tracker.poll()
        assert "1.2.B" in result.grouped
        assert result.waiting == ["1.2.A"]
        assert [s.study_uid for s in store.studies_ready()] == ["1.2.A"]
        # tried again later (a fault may pass), not on every pass
        monkeypatch.setattr(tracker_module, "group_acquisitions", real)
        clock.now = 1011.0
        assert tracker.poll().waiting == ["1.2.A"]
        clock.now = 1010.0 + tracker_module.FAILED_RETRY_S
        assert "1.2.A" in tracker.poll().grouped
        assert not store.studies_ready()


def test_images_without_an_echo_time_are_named_as_such() -> None:
    """Magnitude and phase images with no EchoTime: not 'no magnitude or phase images'."""
    [reason] = problems(group_acquisitions(series(5, M, [None]) + series(6, P, [None])))
    assert reason.endswith(
        "10 images without an echo time, and no magnitude or phase images with one")


def test_single_echo_scans_are_merged_only_when_the_headers_allow_one_acquisition() -> None:
    """Series of one echo time each: one series per echo (Siemens XA: same description, no
    echo numbers) join as echoes; two GE scans each written as echo number 1, or two series
    with different descriptions, are two scans (never one "2 echoes" acquisition)."""
    from dataclasses import replace

    def numbered(infos: list[InstanceInfo], echo: int) -> list[InstanceInfo]:
        return [replace(i, frames=tuple(replace(f, echo_number=echo) for f in i.frames))
                for i in infos]

    xa = series(5, M, [5.0]) + series(6, P, [5.0]) + series(7, M, [10.0]) + series(8, P, [10.0])
    [plan] = plans(group_acquisitions(xa))
    assert plan.series_numbers == (5, 6, 7, 8) and plan.n_echoes == 2

    numbered_xa = (numbered(series(5, M, [5.0]) + series(6, P, [5.0]), 1)
                   + numbered(series(7, M, [10.0]) + series(8, P, [10.0]), 2))
    assert [p.n_echoes for p in plans(group_acquisitions(numbered_xa))] == [2]

    ge = (numbered(series(5, M, [5.0]) + series(6, P, [5.0]), 1)
          + numbered(series(7, M, [10.0]) + series(8, P, [10.0]), 1))
    results = group_acquisitions(ge)
    assert not plans(results)
    assert all("1 echo, the rule needs at least 2" in r for r in problems(results))

    named = (series(5, M, [5.0], description="gre_te5") + series(6, P, [5.0],
                                                                 description="gre_te5")
             + series(7, M, [10.0], description="gre_te10")
             + series(8, P, [10.0], description="gre_te10"))
    assert not plans(group_acquisitions(named))


# ---------------------------------------------------------------------------------------------
# a plan as JSON (what the store keeps for the acquisition's job)


def assert_same_plan(read: AcquisitionPlan, written: AcquisitionPlan) -> None:
    """Every field of two plans (and of their T1w references) equal, frame by frame."""
    import dataclasses

    import numpy as np

    for f in dataclasses.fields(AcquisitionPlan):
        a, b = getattr(read, f.name), getattr(written, f.name)
        if f.name == "affine":
            assert a.dtype == b.dtype and np.array_equal(a, b), f.name
        elif f.name == "t1w" and b is not None:
            for g in dataclasses.fields(type(b)):
                x, y = getattr(a, g.name), getattr(b, g.name)
                assert (np.array_equal(x, y) if g.name == "affine" else x == y), g.name
        else:
            assert a == b and type(a) is type(b), f.name


def test_a_plan_read_back_from_json_equals_the_plan_written(tmp_path: Path) -> None:
    """Real simulated files: classic Siemens with a same-session T1w, and Enhanced MR (every
    echo and part as frames of one file); paths are kept relative to the root."""
    import json

    from qsmnode.dicom.grouping import plan_from_json, plan_to_json
    from qsmnode.dicom.headers import summarize_files
    from tests.dicomutil import T1W_SEED, write_t1w
    from tests.nodeutil import write_study

    write_study(tmp_path / "classic", "siemens", T1W_SEED)
    write_t1w(tmp_path / "classic")
    write_study(tmp_path / "enhanced", "enhanced", 72)
    for folder in ("classic", "enhanced"):
        files = sorted((tmp_path / folder).rglob("*.dcm"))
        [plan] = plans(group_acquisitions(summarize_files(files)))
        assert (plan.t1w is not None) == (folder == "classic")
        data = json.loads(json.dumps(plan_to_json(plan, tmp_path)))
        paths = {row["path"] for row in data["instances"]}
        assert paths and all(p.startswith(f"{folder}/") for p in paths)
        assert_same_plan(plan_from_json(data, tmp_path), plan)
        assert_same_plan(plan_from_json(plan_to_json(plan)), plan)
