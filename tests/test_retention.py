"""Retention: finished, delivered studies lose their files by age or in an emergency clean;
undelivered or unprocessed data stays. Studies are made directly in a store, with small files,
a fake clock and an injected free-disk figure."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from qsmnode.cli import main as cli_main
from qsmnode.node.audit import AuditLog
from qsmnode.node.config import (
    DestinationConfig,
    ListenerConfig,
    PathsConfig,
    RetentionConfig,
    Settings,
)
from qsmnode.node.retention import DAY_S, Retention, retention_status
from qsmnode.node.spool import MIB
from qsmnode.node.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    InstanceRecord,
    NewAcquisition,
    NewProblem,
    OutboxRecord,
    SendOutcome,
    Store,
)
from qsmnode.node.store.queries import read_counts, read_store

T0 = 1_700_000_000.0
OWNER = "test:1"
MR = "1.2.840.10008.5.1.4.1.1.4"
PMAP = "1.2.840.10008.5.1.4.1.1.30"
EXPLICIT = "1.2.840.10008.1.2.1"
SIZE = 100 * 1024


def settings(state_dir: Path, destinations: tuple[str, ...] = ("pacs",),
             **retention: object) -> Settings:
    return dataclasses.replace(
        Settings(), paths=PathsConfig(state_dir=state_dir),
        listener=ListenerConfig(min_free_disk_mb=1),
        destinations=tuple(DestinationConfig(name, name.upper(), "127.0.0.1", 104)
                           for name in destinations),
        retention=RetentionConfig(**retention),  # type: ignore[arg-type]
    )


class Lab:
    """A state directory with a store, and studies made in it step by step."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.audit_path = state_dir / "audit.log"
        self.store = Store.in_state_dir(state_dir, audit=AuditLog(self.audit_path))

    def file(self, kind: str, study: str, series: str, sop: str) -> str:
        path = self.state_dir / kind / study / series / f"{sop}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * SIZE)
        return path.relative_to(self.state_dir).as_posix()

    def receive(self, seed: int, at: float, n: int = 3) -> str:
        study, series = f"1.2.826.0.9.{seed}", f"1.2.826.0.9.{seed}.1"
        for i in range(1, n + 1):
            sop = f"{series}.{i}"
            path = self.file("spool", study, series, sop)
            assert self.store.add_instance(InstanceRecord(
                sop, MR, study, series, EXPLICIT, path, SIZE, "SCANNER7T", "127.0.0.1", at))
        assert self.store.complete_series(series, n, "quiet", None, at)
        return study

    def group(self, study: str, at: float, problem: bool = False) -> None:
        series = f"{study}.1"
        count = len(self.store.study_instances(study))
        if problem:
            found = ([], [NewProblem(study, (series,), "1 slice missing")])
        else:
            found = ([NewAcquisition(study, (series,), {"series_numbers": [5]})], [])
        assert self.store.record_grouping(study, count, *found, at) is not None

    def process(self, at: float, *, fail: bool = False, derived: int = 2,
                destinations: tuple[str, ...] = ("pacs",)) -> list[str]:
        job = self.store.claim_job(OWNER, 100.0, at)
        assert job is not None
        acquisition = self.store.acquisition(job.acquisition_id)
        assert acquisition is not None
        if fail:
            assert self.store.fail_job_attempt(job.id, OWNER, "QSM failed", 1, at) is not None
            return []
        study = acquisition.study_uid
        records = []
        for i in range(1, derived + 1):
            sop = f"{study}.99.{i}"
            path = self.file("outbox", study, f"{study}.99", sop)
            records.append(OutboxRecord(sop, PMAP, study, f"{study}.99", EXPLICIT, path, SIZE,
                                        at, job_id=job.id))
        assert self.store.finish_job(job.id, OWNER, {}, at, records, destinations)
        return [r.sop_instance_uid for r in records]

    def deliver(self, sops: list[str], at: float, destination: str = "pacs") -> None:
        outcomes = [SendOutcome(sop, destination, True, 0) for sop in sops]
        assert self.store.record_send_outcomes(outcomes, at) == len(sops)

    def delivered_study(self, seed: int, at: float) -> str:
        study = self.receive(seed, at)
        self.group(study, at)
        self.deliver(self.process(at), at)
        return study

    def files(self, kind: str, study: str) -> list[Path]:
        return sorted((self.state_dir / kind / study).rglob("*.dcm"))

    def events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return Lab(tmp_path / "state")


def late_instance(lab: Lab, study: str, n: int, at: float) -> str:
    """An instance received for a series of ``study`` already complete and grouped, which the
    tracker has not seen yet (it re-opens the series at its next poll)."""
    series = f"{study}.1"
    sop = f"{series}.{n}"
    path = lab.file("spool", study, series, sop)
    assert lab.store.add_instance(InstanceRecord(sop, MR, study, series, EXPLICIT, path, SIZE,
                                                 "S", "h", at))
    return path


def test_delivered_study_goes_at_age_zero_and_undelivered_stays(lab: Lab) -> None:
    delivered = lab.delivered_study(1, T0)
    pending = lab.receive(2, T0)  # processed, sends still pending
    lab.group(pending, T0)
    lab.process(T0)
    queued = lab.receive(3, T0)  # grouped, job not run yet
    lab.group(queued, T0)
    still_open = f"1.2.826.0.9.{4}"
    lab.file("spool", still_open, f"{still_open}.1", f"{still_open}.1.1")
    lab.store.add_instance(InstanceRecord(f"{still_open}.1.1", MR, still_open, f"{still_open}.1",
                                          EXPLICIT, f"spool/{still_open}/{still_open}.1/"
                                          f"{still_open}.1.1.dcm", SIZE, "S", "h", T0))

    retention = Retention(settings(lab.state_dir, spool_days=0, outbox_days=0), lab.store,
                          clock=lambda: T0 + 1, free_bytes=lambda: 10**15)
    result = retention.step()

    assert {(p.study_uid, p.kind, p.reason) for p in result.pruned} == {
        (delivered, "spool", "age"), (delivered, "outbox", "age")}
    assert not lab.files("spool", delivered) and not lab.files("outbox", delivered)
    assert not (lab.state_dir / "spool" / delivered).exists()  # emptied folders go too
    for study in (pending, queued, still_open):
        assert lab.files("spool", study), study
    assert len(lab.files("outbox", pending)) == 2
    # rows are kept and marked, with a record of the pruning
    db = sqlite3.connect(lab.store.path)
    marked = db.execute("SELECT count(*) FROM instances WHERE study_uid = ? AND pruned_at "
                        "IS NOT NULL", (delivered,)).fetchone()[0]
    assert marked == 3
    assert db.execute("SELECT count(*) FROM outbox WHERE pruned_at IS NOT NULL").fetchone()[0] == 2
    assert {(p.kind, p.instances, p.bytes) for p in lab.store.prunings()} == {
        ("spool", 3, 3 * SIZE), ("outbox", 2, 2 * SIZE)}
    pruned = [e for e in lab.events() if e["event"] == "pruned"]
    assert {(e["kind"], e["reason"], e["study_uid"]) for e in pruned} == {
        ("spool", "age", delivered), ("outbox", "age", delivered)}
    # a second pass finds nothing more
    assert not retention.prune_by_age(T0 + 2).pruned
    # the metrics report what is kept and what was removed
    with read_store(lab.state_dir) as db:
        counts = read_counts(db)
    assert counts.pruned_bytes[("spool", "age")] == 3 * SIZE
    assert counts.pruned_bytes[("outbox", "age")] == 2 * SIZE
    assert counts.pruned_bytes[("spool", "emergency")] == 0
    assert counts.retained_bytes == {"spool": 7 * SIZE, "outbox": 2 * SIZE}


def test_age_counts_from_the_last_event_with_back_dated_rows(lab: Lab) -> None:
    old = lab.delivered_study(1, T0 - 40 * DAY_S)
    recent = lab.delivered_study(2, T0 - 10 * DAY_S)
    retention = Retention(settings(lab.state_dir, spool_days=30, outbox_days=7), lab.store,
                          clock=lambda: T0, free_bytes=lambda: 10**15)
    result = retention.prune_by_age()
    assert {(p.study_uid, p.kind) for p in result.pruned} == {
        (old, "spool"), (old, "outbox"), (recent, "outbox")}
    assert lab.files("spool", recent) and not lab.files("outbox", recent)
    assert not lab.files("spool", old)
    # the recent study's images go once they are 30 days old
    assert not retention.prune_by_age(T0 + 19 * DAY_S).pruned
    assert [p.kind for p in retention.prune_by_age(T0 + 21 * DAY_S).pruned] == ["spool"]


def test_ignored_acquisitions_and_resolved_problems_are_final_but_failed_sends_are_not(
        lab: Lab) -> None:
    ignored = lab.receive(1, T0)  # a rule leaves it out: never processed, by design
    series = f"{ignored}.1"
    assert lab.store.record_grouping(ignored, 3, [NewAcquisition(
        ignored, (series,), {"series_numbers": [5]}, "field strength 3 T")], [], T0)
    resolved = lab.receive(2, T0)  # a slice was missing; it came, and all was processed
    lab.group(resolved, T0, problem=True)
    late_instance(lab, resolved, 4, T0)
    assert lab.store.reopen_late_series(T0)
    assert lab.store.complete_series(f"{resolved}.1", 4, "quiet", None, T0)
    lab.group(resolved, T0)
    assert not lab.store.problems()
    lab.deliver(lab.process(T0), T0)
    failed_send = lab.receive(3, T0)
    lab.group(failed_send, T0)
    sops = lab.process(T0)
    lab.store.record_send_outcomes(
        [SendOutcome(sop, "pacs", False, 0xA700, "refused", T0, give_up=True) for sop in sops],
        T0)
    retention = Retention(settings(lab.state_dir, spool_days=0, outbox_days=0), lab.store,
                          clock=lambda: T0 + 1)
    pruned = {(p.study_uid, p.kind) for p in retention.prune_by_age().pruned}
    assert pruned == {(ignored, "spool"), (resolved, "spool"), (resolved, "outbox")}
    assert len(lab.files("outbox", failed_send)) == 2 and lab.files("spool", failed_send)


def test_every_destination_must_have_the_objects(lab: Lab) -> None:
    study = lab.receive(1, T0)
    lab.group(study, T0)
    sops = lab.process(T0, destinations=("pacs", "research"))
    lab.deliver(sops, T0, "pacs")
    two = settings(lab.state_dir, ("pacs", "research"), spool_days=0, outbox_days=0)
    assert not Retention(two, lab.store, clock=lambda: T0 + 1).prune_by_age().pruned
    # with no destination at all, derived objects are never delivered, so they stay
    none = settings(lab.state_dir, (), spool_days=0, outbox_days=0)
    assert not Retention(none, lab.store, clock=lambda: T0 + 1).prune_by_age().pruned
    lab.deliver(sops, T0 + 5, "research")
    pruned = Retention(two, lab.store, clock=lambda: T0 + 6).prune_by_age().pruned
    assert {p.kind for p in pruned} == {"spool", "outbox"}


def test_a_late_image_makes_a_study_busy_again(lab: Lab) -> None:
    study = lab.delivered_study(1, T0)
    series = f"{study}.1"
    path = lab.file("spool", study, series, f"{series}.9")
    lab.store.add_instance(InstanceRecord(f"{series}.9", MR, study, series, EXPLICIT, path,
                                          SIZE, "S", "h", T0 + 5))
    lab.store.reopen_late_series(T0 + 6)
    retention = Retention(settings(lab.state_dir, spool_days=0, outbox_days=0), lab.store,
                          clock=lambda: T0 + 10)
    assert not retention.prune_by_age().pruned
    assert len(lab.files("spool", study)) == 4


def test_a_pruned_instance_sent_again_is_recorded_again(lab: Lab) -> None:
    study = lab.delivered_study(1, T0)
    Retention(settings(lab.state_dir, spool_days=0, outbox_days=0), lab.store,
              clock=lambda: T0 + 1).prune_by_age()
    sop = f"{study}.1.1"
    assert lab.store.instance_paths() == set()
    path = lab.file("spool", study, f"{study}.1", sop)
    assert lab.store.add_instance(InstanceRecord(sop, MR, study, f"{study}.1", EXPLICIT, path,
                                                 SIZE, "S", "h", T0 + 100))
    assert lab.store.instance_paths() == {path}
    series = lab.store.get_series(f"{study}.1")
    assert series.received_count == 3  # not a late instance
    assert series.last_received_at == T0 + 100  # retention's age counts from it again
    # the resend of a study's pruned derived objects queues nothing
    assert lab.store.requeue_sends(T0 + 101, study_uid=study, destinations=["pacs"]) == 0


def emergency_lab(lab: Lab) -> tuple[list[str], str, int]:
    """Three delivered studies of 500 KiB each, oldest first (made in another order), an
    older undelivered one, and a free-disk base 700 KiB below 2 MiB."""
    studies = [lab.delivered_study(seed, T0 + seed) for seed in (3, 1, 2)]
    studies.sort(key=lambda uid: int(uid.rsplit(".", 1)[1]))
    undelivered = lab.receive(9, T0 - 1000)
    lab.group(undelivered, T0 - 1000)
    lab.process(T0 - 1000)
    return studies, undelivered, 2 * MIB - 700 * 1024


def test_emergency_clean_removes_delivered_studies_oldest_first_until_above(lab: Lab) -> None:
    studies, undelivered, base = emergency_lab(lab)

    def free_bytes() -> int:
        summary = lab.store.retention_summary()
        return base + summary["spool"]["pruned_bytes"] + summary["outbox"]["pruned_bytes"]

    config = settings(lab.state_dir, enabled=False, spool_days=0, outbox_days=0,
                      emergency_margin_mb=1)
    retention = Retention(config, lab.store, clock=lambda: T0 + 50, free_bytes=free_bytes)
    assert retention.emergency_threshold_bytes == 2 * MIB
    result = retention.step()
    assert result.emergency
    # each study holds 500 KiB: the two oldest are removed, then free disk is above 2 MiB
    assert [p.study_uid for p in result.pruned] == [studies[0]] * 2 + [studies[1]] * 2
    assert {p.reason for p in result.pruned} == {"emergency"}
    assert result.free_bytes is not None and result.free_bytes >= 2 * MIB
    assert lab.files("spool", studies[2]) and lab.files("outbox", studies[2])
    assert lab.files("spool", undelivered) and lab.files("outbox", undelivered)
    events = [e for e in lab.events() if e["event"] == "pruned"]
    assert len(events) == 4 and all(e["reason"] == "emergency" for e in events)
    assert all(e["free_bytes"] < 2 * MIB for e in events)
    # above the threshold nothing more goes
    assert not retention.step().pruned


def test_emergency_clean_never_removes_undelivered_data(lab: Lab) -> None:
    study = lab.receive(1, T0)
    lab.group(study, T0)
    lab.process(T0)
    config = settings(lab.state_dir, enabled=False, emergency_margin_mb=1)
    retention = Retention(config, lab.store, clock=lambda: T0, free_bytes=lambda: 0)
    result = retention.step()
    assert result.emergency and not result.pruned
    assert len(lab.files("spool", study)) == 3 and len(lab.files("outbox", study)) == 2


def test_store_of_version_3_is_migrated_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "qsmnode.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    for script in MIGRATIONS[:3]:
        db.executescript(script)
    db.execute("PRAGMA user_version = 3")
    db.execute("INSERT INTO series (series_uid, study_uid, sop_class_uid, received_count, "
               "first_received_at, last_received_at) VALUES ('1.2.1', '1.2', ?, 1, 1, 1)", (MR,))
    db.execute("INSERT INTO instances (sop_instance_uid, sop_class_uid, study_uid, series_uid, "
               "transfer_syntax_uid, path, size, calling_ae, peer_address, received_at) "
               "VALUES ('1.2.1.1', ?, '1.2', '1.2.1', ?, 'spool/x.dcm', 5, 'S', 'h', 1)",
               (MR, EXPLICIT))
    db.close()
    with Store(path) as store:
        assert store.schema_version() == SCHEMA_VERSION == len(MIGRATIONS)
        assert store.instance_paths() == {"spool/x.dcm"}
        assert store.retention_summary()["spool"] == {
            "instances": 1, "bytes": 5, "pruned_instances": 0, "pruned_bytes": 0}


def test_status_shows_retention(lab: Lab, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    study = lab.delivered_study(1, T0)
    Retention(settings(lab.state_dir, spool_days=0, outbox_days=0), lab.store,
              clock=lambda: T0 + 1).prune_by_age()
    config = tmp_path / "node.toml"
    config.write_text(f'[paths]\nstate_dir = "{lab.state_dir}"\n\n[retention]\nspool_days = 2\n')
    assert cli_main(["status", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "retention: by age after 2 days (spool), 30 days (outbox)" in text
    assert "spool keeps 0 instances (0.0 MiB), 3 pruned (0.3 MiB)" in text
    assert "outbox keeps 0 instances (0.0 MiB), 2 pruned (0.2 MiB)" in text
    assert study in text and "age" in text
    assert cli_main(["status", "--config", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["retention"]
    assert report["kept"]["spool"]["pruned_instances"] == 3
    assert {p["kind"] for p in report["prunings"]} == {"spool", "outbox"}


def test_resend_of_a_pruned_study_says_its_results_were_removed(
        lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = lab.delivered_study(1, T0)
    Retention(settings(lab.state_dir, spool_days=0, outbox_days=0), lab.store,
              clock=lambda: T0 + 1).prune_by_age()
    config = tmp_path / "node.toml"
    config.write_text(f'[paths]\nstate_dir = "{lab.state_dir}"\n')
    assert cli_main(["resend", "--study", study, "--config", str(config)]) == 1
    error = capsys.readouterr().err
    assert f"the derived instances of study {study} were removed by retention on " in error
    assert "(age clean, pruning" in error and "nothing left to send again" in error


@pytest.mark.parametrize("how", ["age", "emergency"])
def test_a_late_image_not_yet_seen_by_the_tracker_is_kept(lab: Lab, how: str) -> None:
    study = lab.delivered_study(1, T0)
    path = late_instance(lab, study, 9, T0 + 5)  # the tracker re-opens the series in 0.5 s
    if how == "age":
        config = settings(lab.state_dir, spool_days=0, outbox_days=0)
        free = 10**15
    else:
        config = settings(lab.state_dir, enabled=False, emergency_margin_mb=1)
        free = 0
    retention = Retention(config, lab.store, clock=lambda: T0 + 10, free_bytes=lambda: free)
    pruned = retention.step().pruned
    assert (lab.state_dir / path).is_file()
    assert len(lab.files("spool", study)) == 4
    assert "spool" not in {p.kind for p in pruned}
    assert lab.store.instance_paths() >= {path}
    # once the tracker has re-opened the series, the store itself says busy
    lab.store.reopen_late_series(T0 + 11)
    assert not retention.step().pruned


@pytest.mark.parametrize("how", ["age", "emergency"])
def test_images_of_an_unresolved_problem_or_a_failed_job_are_kept(lab: Lab, how: str) -> None:
    failed_job = lab.receive(1, T0)
    lab.group(failed_job, T0)
    lab.process(T0, fail=True)
    problem = lab.receive(2, T0)  # e.g. a slice missing: it may still come
    lab.group(problem, T0, problem=True)
    delivered = lab.delivered_study(3, T0)
    if how == "age":
        config = settings(lab.state_dir, spool_days=0, outbox_days=0)
        free = 10**15
    else:
        config = settings(lab.state_dir, enabled=False, emergency_margin_mb=1)
        free = 0
    retention = Retention(config, lab.store, clock=lambda: T0 + 1, free_bytes=lambda: free)
    pruned = {(p.study_uid, p.kind) for p in retention.step().pruned}
    assert pruned == {(delivered, "spool"), (delivered, "outbox")}
    assert len(lab.files("spool", failed_job)) == 3 and len(lab.files("spool", problem)) == 3
    assert not retention.step().pruned
    # and the status does not count them as removable
    assert retention_status(config, lab.store, free)["finished_studies"] == 0


def test_a_late_image_arriving_while_a_study_is_checked_waits_for_the_removal(
        lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    study = lab.delivered_study(1, T0)
    prune_study = lab.store.prune_study
    arrivals: list[threading.Thread] = []

    def racing_prune_study(*args: Any, **kwargs: Any) -> Any:
        # the receiver stores a late image after retention has checked the study
        if args[1] == "spool" and not arrivals:
            arrivals.append(threading.Thread(
                target=late_instance, args=(lab, study, 9, T0 + 5), daemon=True))
            arrivals[0].start()
            arrivals[0].join(0.3)
        return prune_study(*args, **kwargs)

    monkeypatch.setattr(lab.store, "prune_study", racing_prune_study)
    config = settings(lab.state_dir, enabled=False, emergency_margin_mb=1)
    retention = Retention(config, lab.store, clock=lambda: T0 + 10, free_bytes=lambda: 0)
    retention.step()
    arrivals[0].join(10)
    late = f"spool/{study}/{study}.1/{study}.1.9.dcm"
    assert (lab.state_dir / late).is_file()
    assert late in lab.store.instance_paths()


@pytest.mark.parametrize("killed_in", ["outbox", "spool"])
def test_killed_between_recording_and_deleting_nothing_is_lost_at_restart(
        lab: Lab, killed_in: str) -> None:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from qsmnode.node.outbox import Outbox
    from qsmnode.node.recovery import recover
    from qsmnode.node.spool import Spool

    study = lab.delivered_study(1, T0)
    for path in lab.files("spool", study):  # real DICOM, so the spool's recovery reads them
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MR
        ds.file_meta.MediaStorageSOPInstanceUID = path.stem
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = MR, path.stem
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, f"{study}.1", "MR"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        os.utime(path, (T0, T0))  # written when received
    config = settings(lab.state_dir, spool_days=0, outbox_days=0)
    retention = Retention(config, lab.store, clock=lambda: T0 + 1)
    delete = retention._delete

    def killed(pruning: Any) -> int:
        if pruning.kind == killed_in:
            raise KeyboardInterrupt("killed")
        return delete(pruning)

    retention._delete = killed  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        retention.prune_by_age()
    lab.store.close()

    with Store.in_state_dir(lab.state_dir) as store:  # the next start
        recovery = recover(store, Spool(lab.state_dir / "spool"), lab.state_dir)
        Outbox(lab.state_dir).recover(store)
        assert not recovery.missing and not recovery.quarantined
        # the outbox's marked files are deleted; the spool's are recorded again
        assert not lab.files("outbox", study)
        assert len(lab.files("spool", study)) == 3
        assert store.instance_paths() == {p.relative_to(lab.state_dir).as_posix()
                                          for p in lab.files("spool", study)}
        # and the next pass removes what is left, consistently
        again = Retention(config, store, clock=lambda: T0 + 2).prune_by_age().pruned
        assert [p.kind for p in again] == ["spool"]
        assert not lab.files("spool", study) and not store.instance_paths()
        assert store.retention_summary()["spool"]["instances"] == 0
