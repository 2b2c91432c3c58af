"""The tracker in-process: series completion (count, group count, quiet period, maximum wait,
late instances) from store records with a controlled clock, and grouping of simulated studies
ingested into a real spool (acquisitions, jobs, problems, rules, idempotence)."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest

from qsmnode.node.store import NewAcquisition, Store
from qsmnode.node.tracker import Tracker, expected_instances
from tests.nodeutil import Clock, add, ingest, settings_for, study_uid, write_study

MR = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def test_expected_instances() -> None:
    assert expected_instances(ENHANCED_MR, None) == 1
    assert expected_instances(ENHANCED_MR, 40) == 1
    assert expected_instances(MR, 40) == 40
    assert expected_instances(MR, None) is None and expected_instances(MR, 0) is None


def test_series_complete_by_count_group_count_quiet_and_max_wait(tmp_path: Path) -> None:
    clock = Clock(100.0)
    with Store.in_state_dir(tmp_path) as store:
        tracker = Tracker(settings_for(tmp_path, quiet=1.0, max_wait=3.0), store, clock=clock)
        for n in range(3):  # no header count: quiet period
            add(store, f"1.1.{n}", "9.1", 100.0, study="1.2.1")
        add(store, "1.2.1", "9.2", 100.0, study="1.2.2", sop_class=ENHANCED_MR)  # one file
        for n in range(4):  # ImagesInAcquisition reached
            add(store, f"1.3.{n}", "9.3", 100.0, study="1.2.3", iia=4)
        for series in ("9.41", "9.42"):  # XA-like: two series add up to the count
            for n in range(3):
                add(store, f"1.4.{series}.{n}", series, 100.0, study="1.2.4", iia=6)
        for n in range(2):  # count not reached: quiet period, expected count recorded
            add(store, f"1.5.{n}", "9.5", 100.0, study="1.2.5", iia=10)

        clock.now = 100.5
        done = tracker.update_series(clock.now).completed
        assert done == {"9.2": "count", "9.3": "count", "9.41": "count", "9.42": "count"}
        assert store.get_series("9.5").expected_count == 10  # type: ignore[union-attr]
        assert store.get_series("9.3").completed_count == 4  # type: ignore[union-attr]

        clock.now = 101.0
        assert tracker.update_series(clock.now).completed == {"9.1": "quiet", "9.5": "quiet"}
        assert {s.series_uid for s in store.series("open")} == set()

        # an instance every 0.5 s never leaves a quiet second: the maximum wait closes it
        clock.now, n = 200.0, 0
        while not store.get_series("9.6") or store.get_series("9.6").state == "open":  # type: ignore[union-attr]
            add(store, f"1.6.{n}", "9.6", clock.now, study="1.2.6")
            tracker.update_series(clock.now)
            clock.now += 0.5
            n += 1
            assert n < 20
        series = store.get_series("9.6")
        assert series is not None and series.completion == "max_wait"
        assert series.completed_at is not None and series.completed_at >= 203.0

        # a late instance re-opens a complete series; its maximum wait counts from then
        add(store, "1.3.late", "9.3", 300.0, study="1.2.3", iia=4)
        clock.now = 300.2
        outcome = tracker.poll()
        assert outcome.reopened == ["9.3"]
        assert outcome.completed == {"9.3": "count"}  # 5 >= 4 at once
        again = store.get_series("9.3")
        assert again is not None and again.opened_at == 300.2 and again.completed_count == 5

        # completion is conditional: an instance that arrived since the count was read wins
        add(store, "1.7.0", "9.7", 400.0, study="1.2.7")
        add(store, "1.7.1", "9.7", 400.0, study="1.2.7")
        assert not store.complete_series("9.7", 1, "quiet", None, 401.0)
        assert store.complete_series("9.7", 2, "quiet", None, 401.0)


# ------------------------------------------------------------------------------------------------
# Grouping simulated studies from a real spool


def by_instance_number(files: list[Path], *numbers: int) -> list[Path]:
    return [f for f in files if int(f.stem) in numbers]


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    out = tmp_path_factory.mktemp("studies")
    return {
        "siemens-xa": write_study(out / "xa", "siemens-xa", 21),
        "philips": write_study(out / "philips", "philips", 22),
        "siemens": write_study(out / "siemens", "siemens", 23),
        "enhanced": write_study(out / "enhanced", "enhanced", 24),
    }


def test_complete_studies_become_one_acquisition_and_one_job_each(
    tmp_path: Path, studies: dict[str, list[Path]]
) -> None:
    clock = Clock(10_000.0)
    woken = []
    with Store.in_state_dir(tmp_path) as store:
        tracker = Tracker(settings_for(tmp_path), store, clock=clock,
                          on_jobs=lambda: woken.append(True))
        for style in ("siemens-xa", "philips"):
            ingest(tmp_path, store, studies[style], 9_000.0)
        result = tracker.poll()
        assert set(result.completed.values()) == {"quiet"} and len(result.completed) == 7
        assert len(result.grouped) == 2 and woken
        acquisitions = store.acquisitions()
        assert [a.state for a in acquisitions] == ["accepted", "accepted"]
        assert {a.study_uid for a in acquisitions} == {study_uid(21), study_uid(22)}
        for acquisition in acquisitions:
            summary = acquisition.summary
            assert summary["n_echoes"] == 3 and summary["shape"] == [24, 28, 12]
            assert summary["echo_times_s"] == pytest.approx([0.005, 0.0105, 0.016])
            assert summary["field_strength_t"] == pytest.approx(7.0)
            assert summary["voxel_size_mm"] == pytest.approx([7.0, 7.0, 12.0])
            assert summary["instances"] == 72
        xa = next(a for a in acquisitions if a.study_uid == study_uid(21))
        assert len(xa.series_uids) == 6  # one series per echo and part
        jobs = store.jobs()
        assert [(j.state, j.attempts) for j in jobs] == [("queued", 0), ("queued", 0)]
        assert {j.acquisition_id for j in jobs} == {a.id for a in acquisitions}
        assert len(store.job_instances(jobs[0].id)) == 72
        assert not store.problems()

        # nothing happens twice
        clock.now += 5
        again = tracker.poll()
        assert not again.completed and not again.grouped
        assert len(store.acquisitions()) == 2 and len(store.jobs()) == 2

        # a late instance re-opens the study; the same acquisition gets no second job
        late = studies["philips"][0]
        ds = pydicom.dcmread(late)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ds.SOPInstanceUID}.9"
        capture = tmp_path / "capture.dcm"
        ds.save_as(capture, enforce_file_format=True)
        ingest(tmp_path, store, [capture], clock.now)
        assert tracker.poll().reopened
        clock.now += 2
        regrouped = tracker.poll()
        assert len(regrouped.grouped) == 1
        outcome = regrouped.grouped[study_uid(22)]
        assert not outcome.created and not outcome.jobs and len(outcome.known) == 1
        assert len(store.jobs()) == 2


def test_problems_wait_for_the_quiet_period_and_resolve_when_the_images_arrive(
    tmp_path: Path, studies: dict[str, list[Path]]
) -> None:
    """Series complete by count; the phase series is not there yet: the "no phase" problem
    waits for the quiet period, is recorded, then resolved when the phase arrives."""
    files = {}
    for path in studies["siemens"]:
        ds = pydicom.dcmread(path)
        ds.ImagesInAcquisition = 36
        files[path] = tmp_path / "in" / path.parent.name / path.name
        files[path].parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(files[path])
    magnitude = [files[p] for p in studies["siemens"] if p.parent.name.endswith("_M")]
    phase = [files[p] for p in studies["siemens"] if p.parent.name.endswith("_P")]
    clock = Clock(5_000.0)
    state = tmp_path / "state"
    with Store.in_state_dir(state) as store:
        tracker = Tracker(settings_for(state, quiet=5.0, max_wait=60.0), store, clock=clock)
        ingest(state, store, magnitude, 5_000.0)
        clock.now = 5_001.5
        first = tracker.poll()
        assert list(first.completed.values()) == ["count"]
        assert first.waiting == [study_uid(23)] and not store.problems()
        clock.now = 5_005.0
        tracker.poll()
        [problem] = store.problems()
        assert "no phase: only magnitude images (3 echoes) were found" in problem.reason
        assert not store.acquisitions() and not store.jobs()

        ingest(state, store, phase, 5_010.0)
        clock.now = 5_011.5
        second = tracker.poll()
        assert list(second.completed.values()) == ["count"]
        outcome = second.grouped[study_uid(23)]
        assert len(outcome.created) == 1 and len(outcome.jobs) == 1
        assert [p.id for p in outcome.resolved_problems] == [problem.id]
        assert not store.problems()
        assert store.problems(include_resolved=True)[0].resolved_at == 5_011.5


def test_missing_slice_is_a_problem_until_the_slice_arrives(
    tmp_path: Path, studies: dict[str, list[Path]]
) -> None:
    files = studies["siemens"]
    missing = by_instance_number([f for f in files if f.parent.name.endswith("_M")], 18)
    clock = Clock(10_000.0)
    with Store.in_state_dir(tmp_path) as store:
        tracker = Tracker(settings_for(tmp_path), store, clock=clock)
        ingest(tmp_path, store, [f for f in files if f not in missing], 9_000.0)
        tracker.poll()
        [problem] = store.problems()
        assert problem.study_uid == study_uid(23)
        assert "missing slices: magnitude echo 2 (TE 10.5 ms, series 5) has 11 of 12 slices, " \
               "1 slice missing" in problem.reason
        assert not store.jobs()

        ingest(tmp_path, store, missing, clock.now)  # the scanner sends it again
        tracker.poll()
        clock.now += 1.5
        outcome = tracker.poll().grouped[study_uid(23)]
        assert len(outcome.jobs) == 1 and outcome.resolved_problems
        assert not store.problems()


def test_rules_field_strength_and_echo_count(tmp_path: Path,
                                             studies: dict[str, list[Path]]) -> None:
    clock = Clock(10_000.0)
    with Store.in_state_dir(tmp_path) as store:
        tracker = Tracker(settings_for(tmp_path, field_strengths_t=(3.0,)), store, clock=clock)
        ingest(tmp_path, store, studies["enhanced"], 9_000.0)
        tracker.poll()
        [acquisition] = store.acquisitions()
        assert acquisition.state == "ignored"
        assert acquisition.reason == ("field strength 7 T is not among rules.field_strengths_t "
                                      "(3 T)")
        assert not store.jobs()
        # a later grouping under rules that accept it (config changed) queues its job
        record = store.record_grouping(
            acquisition.study_uid, 1,
            [NewAcquisition(acquisition.study_uid, acquisition.series_uids, acquisition.summary)],
            [], clock.now)
        assert record is not None and len(record.jobs) == 1
        assert store.acquisitions()[0].state == "accepted"

    # a problem of series at another field strength is not recorded either (log line only)
    state = tmp_path / "three"
    with Store.in_state_dir(state) as store:
        tracker = Tracker(settings_for(state, field_strengths_t=(3.0,)), store, clock=clock)
        ingest(state, store, studies["siemens"][1:], 9_000.0)
        tracker.poll()
        assert not store.problems() and not store.acquisitions()
        assert store.studies_ready() == []  # grouped: nothing left to do

    state = tmp_path / "seven"
    with Store.in_state_dir(state) as store:
        tracker = Tracker(settings_for(state, field_strengths_t=(6.95,), min_echoes=4), store,
                          clock=clock)
        ingest(state, store, studies["enhanced"], 9_000.0)
        tracker.poll()
        [problem] = store.problems()
        assert "3 echoes, the rule needs at least 4" in problem.reason
        assert not store.acquisitions()


def test_an_unreadable_spool_file_is_a_problem(tmp_path: Path,
                                               studies: dict[str, list[Path]]) -> None:
    clock = Clock(10_000.0)
    with Store.in_state_dir(tmp_path) as store:
        ingest(tmp_path, store, studies["enhanced"], 9_000.0)
        [record] = store.instances()
        (tmp_path / record.path).write_bytes(b"not DICOM any more")
        Tracker(settings_for(tmp_path), store, clock=clock).poll()
        [problem] = store.problems()
        assert "1 spool file could not be read" in problem.reason
        assert not store.acquisitions()


def test_a_late_image_of_a_study_whose_images_retention_removed_says_so(
        tmp_path: Path, studies: dict[str, list[Path]]) -> None:
    clock = Clock(10_000.0)
    with Store.in_state_dir(tmp_path) as store:
        tracker = Tracker(settings_for(tmp_path), store, clock=clock)
        files = studies["siemens"]
        ingest(tmp_path, store, files, 9_000.0)
        tracker.poll()
        [acquisition] = store.acquisitions()
        with store.transaction() as db:  # retention removed the study's images
            db.execute("UPDATE instances SET pruned_at = 9500")
        for record in store.instances():
            (tmp_path / record.path).unlink()
        ds = pydicom.dcmread(files[0])  # one image comes late (sent again, as a new instance)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ds.SOPInstanceUID}.9"
        late = tmp_path / "late.dcm"
        ds.save_as(late, enforce_file_format=True)
        ingest(tmp_path, store, [late], clock.now)
        tracker.poll()
        clock.now += 5
        tracker.poll()
        reasons = [p.reason for p in store.problems()]
        assert any("earlier images were removed by retention after the study was finished"
                   in r for r in reasons), reasons
        assert not any("could not be read" in r for r in reasons), reasons
        assert [a.id for a in store.acquisitions()] == [acquisition.id]  # nothing new to run


def test_a_t1w_in_the_study_is_the_acquisitions_reference_not_a_problem(
    tmp_path: Path, studies: dict[str, list[Path]]
) -> None:
    from qsmnode.node.jobs import job_spec, load_job_acquisition
    from tests.dicomutil import T1W_SCAN, write_t1w

    t1w = write_t1w(tmp_path / "t1w", seed=23)  # series 2 of the Siemens study (seed 23)
    clock = Clock(10_000.0)
    settings = settings_for(tmp_path)
    with Store.in_state_dir(tmp_path) as store:
        tracker = Tracker(settings, store, clock=clock)
        ingest(tmp_path, store, t1w + studies["siemens"], 9_000.0)
        result = tracker.poll()
        assert len(result.grouped) == 1 and not store.problems()
        [acquisition] = store.acquisitions()
        t1w_uid = pydicom.dcmread(t1w[0], stop_before_pixels=True).SeriesInstanceUID
        assert t1w_uid not in acquisition.series_uids and len(acquisition.series_uids) == 2
        summary = acquisition.summary
        assert summary["t1w"]["series_uid"] == t1w_uid
        assert summary["t1w"]["series_number"] == 2
        assert summary["t1w"]["shape"] == list(T1W_SCAN.shape)
        assert summary["t1w"]["instances"] == len(t1w)
        assert summary["t1w_note"].startswith("T1w reference: series 2 't1_mprage_sag'")

        [job] = store.jobs()
        spec = job_spec(store, job, settings)
        assert spec.t1w_series_uid == t1w_uid and len(spec.t1w_files) == len(t1w)
        assert not set(spec.t1w_files) & set(spec.files) and not spec.t1w_error
        assert spec.from_json(spec.to_json()) == spec
        loaded = load_job_acquisition(spec)
        assert loaded.t1w is not None and loaded.t1w.series_uid == t1w_uid
        assert loaded.t1w.image.shape == T1W_SCAN.shape

        # a T1w file changed since the grouping (another series UID): the GRE alone, and why
        changed = pydicom.dcmread(spec.t1w_files[0])
        changed.SeriesInstanceUID = "2.25.99"
        changed.save_as(spec.t1w_files[0])
        loaded = load_job_acquisition(spec)
        assert loaded.t1w is None and loaded.t1w_error.startswith(
            "the T1w series 2 't1_mprage_sag'")
        assert ("changed since it was grouped: its SeriesInstanceUID is not the one it was "
                "grouped with") in loaded.t1w_error
        assert loaded.gre.shape[:3] == tuple(summary["shape"])

        # a pruned T1w file: the job still runs, on the GRE alone, and says why
        os.unlink(spec.t1w_files[0])
        spec = job_spec(store, job, settings)
        assert spec.t1w_files == () and spec.t1w_error.startswith(
            "1 of 20 spool files of the T1w series 2")
        loaded = load_job_acquisition(spec)
        assert loaded.t1w is None and loaded.t1w_error == spec.t1w_error


def test_a_whole_clinical_session_leaves_no_problem_and_every_series_explained(
    tmp_path: Path, shared_data: Path
) -> None:
    """The XA30 session (T1w, BOLD, field map, DWI and ASL with derived maps, no multi-echo
    GRE): zero problems, no acquisition, every series passed over with its reason recorded;
    the study is recognised by its date and description (it has no accession number)."""
    folder = shared_data / "siemens-xa30-session"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent (real data: see ../shared/data/README.md)")
    clock = Clock(10_000.0)
    with Store.in_state_dir(tmp_path) as store:
        tracker = Tracker(settings_for(tmp_path), store, clock=clock)
        ingest(tmp_path, store, sorted(folder.rglob("*.dcm")), 9_000.0)
        [(study, outcome)] = tracker.poll().grouped.items()
        assert not outcome.new_problems and not store.problems(include_resolved=True)
        assert not store.acquisitions() and not store.jobs()
        series = store.series()
        assert len(series) == 20
        why = {s.series_number: s.passed_over for s in series}
        assert all(why.values()), why
        assert "BOLD" in why[7] and "field map" in why[8] and "diffusion" in why[12]
        assert "arterial spin labelling" in why[28] and "T1-weighted" in why[5]
        info = store.studies()[study]
        assert info.accession_number == "" and info.study_date == "20220711"
        assert store.study_senders()[study]

    # pass_over off: the same session is all problems (the old, noisy behaviour)
    state = tmp_path / "strict"
    with Store.in_state_dir(state) as store:
        tracker = Tracker(settings_for(state, pass_over=False), store, clock=clock)
        ingest(state, store, sorted(folder.rglob("*.dcm")), 9_000.0)
        tracker.poll()
        assert len(store.problems()) == 17


def test_a_passed_over_series_is_cleared_when_it_joins_an_acquisition(
    tmp_path: Path, studies: dict[str, list[Path]]
) -> None:
    """One magnitude echo alone is passed over; when the rest of the acquisition arrives the
    series joins it and is no longer marked passed over."""
    files = studies["siemens"]
    first_echo = [f for f in files if f.parent.name.endswith("_M") and int(f.stem) <= 12]
    clock = Clock(10_000.0)
    with Store.in_state_dir(tmp_path) as store:
        tracker = Tracker(settings_for(tmp_path), store, clock=clock)
        ingest(tmp_path, store, first_echo, 9_000.0)
        tracker.poll()
        assert not store.problems()
        [series] = store.series()
        assert series.passed_over and "one echo, magnitude only" in series.passed_over
        ingest(tmp_path, store, [f for f in files if f not in first_echo], clock.now)
        tracker.poll()
        clock.now += 2
        tracker.poll()
        assert len(store.jobs()) == 1
        assert [s.passed_over for s in store.series()] == [None, None]


def test_quiet_period_and_maximum_wait_count_only_time_the_node_was_up(tmp_path: Path) -> None:
    """A series half received before the node went down is not completed the moment it comes
    back (its quiet period ran out while the node was down): both times count from the
    start."""
    with Store.in_state_dir(tmp_path / "state") as store:
        add(store, "1.1", "9.1", 1_000.0)
        clock = Clock(1_000.0 + 3_600.0)  # the node comes back an hour later
        tracker = Tracker(settings_for(tmp_path / "state", quiet=5.0, max_wait=30.0), store,
                          clock=clock, started_at=clock.now)
        tracker.poll()
        assert [s.series_uid for s, _ in store.open_series()] == ["9.1"]
        clock.now += 4.0
        tracker.poll()
        assert [s.series_uid for s, _ in store.open_series()] == ["9.1"]
        add(store, "1.2", "9.1", clock.now)  # the scanner resumes
        clock.now += 5.0
        tracker.poll()
        assert store.open_series() == []
        [series] = store.series()
        assert series.completion == "quiet" and series.received_count == 2


def test_a_non_mr_series_is_passed_over_with_its_sop_class(tmp_path: Path) -> None:
    """A report or screen capture stored beside the images (store_other_sop_classes) is not
    grouped: passed over, naming what it is, and no problem."""
    clock = Clock(10_000.0)
    with Store.in_state_dir(tmp_path) as store:
        tracker = Tracker(settings_for(tmp_path), store, clock=clock)
        add(store, "1.9.1", "9.9", 9_000.0, study="1.2.9",
            sop_class="1.2.840.10008.5.1.4.1.1.88.22")  # Enhanced SR
        tracker.poll()
        [series] = store.series()
        assert series.passed_over == ("not an MR image (Enhanced SR Storage): not a QSM "
                                      "acquisition")
        assert not store.problems()


def test_an_unexpected_grouping_error_is_logged_without_patient_values(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A library error quoting a value of the study's files (as highdicom's do): the log line
    names the attribute instead, and where in the code it was raised; no traceback."""
    import logging

    files = write_study(tmp_path / "source", "siemens-xa", 25)
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    name, birth = str(ds.PatientName), "19450317"
    for path in files:
        one = pydicom.dcmread(path)
        one.PatientBirthDate = birth
        one.save_as(path)

    def fails(self, ready, now):  # type: ignore[no-untyped-def]
        raise ValueError(f"Unable to use {name!r} born {birth}")

    monkeypatch.setattr(Tracker, "group_study", fails)
    with Store.in_state_dir(tmp_path) as store, caplog.at_level(logging.INFO):
        ingest(tmp_path, store, files, 9_000.0)
        Tracker(settings_for(tmp_path), store, clock=Clock(10_000.0)).poll()
    text = caplog.text
    assert "grouping failed (ValueError: Unable to use '<PatientName>' born " \
           "<PatientBirthDate> at test_tracker.py:" in text, text
    assert name not in text and birth not in text and "Traceback" not in text


def test_problem_and_passed_over_reasons_carry_no_patient_values(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Series descriptions that carry the patient's name and ID (a technologist's habit): the
    problem of a slice missing from them, and the reason a diffusion series of the study is
    passed over, are recorded and logged with ``<PatientName>``/``<PatientID>`` in their
    place, as job errors are (issue 14)."""
    import logging

    from pydicom.uid import generate_uid

    family, given, mrn = "Zqxfamily", "Zqxgiven", "ZQX40417"
    files = write_study(tmp_path / "source", "siemens", 26)
    diffusion = []
    series_uid = generate_uid()
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID = f"{family}^{given}", mrn
        ds.SeriesDescription = f"gre {family} {given} {mrn}"
        ds.save_as(path)
        if path.parent.name.endswith("_P"):  # a copy of the phase as a diffusion series
            ds.SeriesInstanceUID, ds.SeriesNumber = series_uid, 9
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.SeriesDescription = f"DWI {given} {family}"
            copy = tmp_path / "dwi" / path.name
            copy.parent.mkdir(exist_ok=True)
            ds.save_as(copy)
            diffusion.append(copy)
    missing = by_instance_number([f for f in files if f.parent.name.endswith("_M")], 18)
    state = tmp_path / "state"
    with Store.in_state_dir(state) as store, caplog.at_level(logging.INFO):
        ingest(state, store, [f for f in files if f not in missing] + diffusion, 9_000.0)
        Tracker(settings_for(state), store, clock=Clock(10_000.0)).poll()
        [problem] = store.problems()
        passed = {s.series_number: s.passed_over for s in store.series()}
    assert "missing slices" in problem.reason
    assert "'gre <PatientName> <PatientID>'" in problem.reason, problem.reason
    assert passed[9] is not None and "'DWI <PatientName> <PatientName>'" in passed[9], passed
    for text in (problem.reason, passed[9], caplog.text):
        assert not any(value in text for value in (family, given, mrn)), text
