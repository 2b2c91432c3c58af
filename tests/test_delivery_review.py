"""Delivery review: the outbox and the sender against a tiny in-process pynetdicom SCP (or a
port nothing listens on), with a fake clock. Fast, no Orthanc, no pipeline.

Each test pins one rule of the PACS administrator: nothing is lost, the PACS is never flooded
(bounded associations and retries, no duplicate storms), and every failure has a clear reason
in the log, never a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from qsmnode.node import sender as sender_module
from qsmnode.node.config import ClientTLSConfig, ConfigError, Settings, load_settings
from qsmnode.node.outbox import Outbox
from qsmnode.node.sender import AssociationFailed, Peer, Sender, send_files
from qsmnode.node.store import SendOutcome, Store
from tests.deliveryutil import settings_for as delivery_settings
from tests.nodeutil import free_port

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
STUDY = "1.2.826.0.1.3680043.99.1"
SERIES = "1.2.826.0.1.3680043.99.1.1"


def instance(n: int, sop_class: str = MR_IMAGE) -> Dataset:
    """A tiny derived instance (no pixel data: the SCPs here do not look)."""
    sop = f"{SERIES}.{n}"
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 501, n
    ds.PatientID = "REVIEW"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def settings_for(state_dir: Path, *peers: Peer, **sender: float) -> Settings:
    """Slow retries (10 s, at most an hour) unless given: the tests step the clock."""
    return delivery_settings(state_dir, *peers,
                             **{"retry_initial_s": 10.0, "retry_max_s": 3600.0, **sender})


@dataclass
class SCP:
    """An in-process storage SCP: ``answer(sop_uid)`` gives the status (default success) or
    ``None`` (never answer: sleep ``hang_s``)."""

    port: int
    received: list[str] = field(default_factory=list)
    associations: int = 0
    answer: Callable[[str], int | None] = lambda sop: 0
    hang_s: float = 2.0


@contextlib.contextmanager
def scp(classes: tuple[str, ...] = (MR_IMAGE, PARAMETRIC_MAP)) -> Iterator[SCP]:
    from pynetdicom import AE, evt

    state = SCP(free_port())

    def on_store(event: Any) -> int:
        sop = str(event.request.AffectedSOPInstanceUID)
        status = state.answer(sop)
        if status is None:
            time.sleep(state.hang_s)
            return 0xA700
        state.received.append(sop)
        return status

    def on_accepted(event: Any) -> None:
        state.associations += 1

    ae = AE(ae_title="STORE")
    for uid in classes:
        ae.add_supported_context(uid, ExplicitVRLittleEndian)
    server = ae.start_server(("127.0.0.1", state.port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store),
                                           (evt.EVT_ACCEPTED, on_accepted)])
    try:
        yield state
    finally:
        server.shutdown()


def peer_at(port: int, name: str = "pacs") -> Peer:
    return Peer(name, "STORE", "127.0.0.1", port)


def queue(state: Path, store: Store, datasets: list[Dataset], destinations: list[str],
          now: float = 1000.0) -> None:
    Outbox(state).add(store, datasets, destinations, now=now)


def states(store: Store, destination: str = "pacs") -> dict[str, str]:
    return {s.sop_instance_uid.rsplit(".", 1)[1]: s.state
            for s in store.sends(destination=destination)}


# ------------------------------------------------------------------------------------------------
# DIMSE statuses


def test_every_warning_status_counts_as_delivered(tmp_path: Path) -> None:
    """PS3.7 Annex C: 0001, 0107, 0116 and Bxxx are warnings: the PACS stored the object.
    Treating them as failures resends a stored object every backoff period, forever."""
    codes = {"1": 0x0000, "2": 0x0107, "3": 0x0116, "4": 0x0001, "5": 0xB00A, "6": 0xB007,
             "7": 0xA900, "8": 0xC000, "9": 0x0111}  # 0111: the PACS holds it already
    now = [1000.0]
    with scp() as server, Store.in_state_dir(tmp_path) as store:
        server.answer = lambda sop: codes[sop.rsplit(".", 1)[1]]
        queue(tmp_path, store, [instance(int(n)) for n in codes], ["pacs"])
        sender = Sender(settings_for(tmp_path, peer_at(server.port)), store,
                        clock=lambda: now[0], timeout_s=5)
        assert sender.step()
        got = states(store)
        assert got == {"1": "sent", "2": "sent", "3": "sent", "4": "sent", "5": "sent",
                       "6": "sent", "7": "pending", "8": "pending", "9": "sent"}
        refused = {s.sop_instance_uid.rsplit(".", 1)[1]: s for s in store.sends(state="pending")}
        assert "0xA900" in (refused["7"].last_error or "")
        assert "0xC000" in (refused["8"].last_error or "")
        now[0] += 12
        assert sender.step()
        assert sorted(server.received) == sorted([f"{SERIES}.{n}" for n in codes]
                                                 + [f"{SERIES}.7", f"{SERIES}.8"])


# ------------------------------------------------------------------------------------------------
# one bad object must not stop the others, nor make the sender loop


def test_unreadable_outbox_file_fails_alone_without_resending_the_batch(tmp_path: Path) -> None:
    now = [1000.0]
    with scp() as server, Store.in_state_dir(tmp_path) as store:
        queue(tmp_path, store, [instance(n) for n in (1, 2, 3)], ["pacs"])
        (record,) = [r for r in store.outbox() if r.sop_instance_uid.endswith(".2")]
        (tmp_path / record.path).write_bytes(b"not a DICOM file at all" * 10)
        sender = Sender(settings_for(tmp_path, peer_at(server.port)), store,
                        clock=lambda: now[0], timeout_s=5)
        assert sender.step()
        assert states(store) == {"1": "sent", "2": "pending", "3": "sent"}
        (bad,) = store.sends(state="pending")
        assert bad.attempts == 1 and bad.next_try_at >= now[0] + 10
        assert "cannot send" in (bad.last_error or "") and str(record.path) in bad.last_error
        assert not sender.step()  # nothing due: no new association, no resend
        assert sorted(server.received) == [f"{SERIES}.1", f"{SERIES}.3"]
        assert server.associations == 1


def test_object_the_peer_never_answers_does_not_block_the_others(tmp_path: Path) -> None:
    """A PACS that hangs (or aborts) on one object: the next try must not start with that
    object again, or the objects behind it are never delivered."""
    now = [1000.0]
    with scp() as server, Store.in_state_dir(tmp_path) as store:
        server.answer = lambda sop: None if sop.endswith(".1") else 0
        server.hang_s = 1.5
        queue(tmp_path, store, [instance(n) for n in (1, 2, 3, 4)], ["pacs"])
        sender = Sender(settings_for(tmp_path, peer_at(server.port)), store,
                        clock=lambda: now[0], timeout_s=0.5, jitter=0)
        assert sender.step()
        assert states(store) == {"1": "pending", "2": "pending", "3": "pending",
                                 "4": "pending"}
        errors = {s.sop_instance_uid.rsplit(".", 1)[1]: s.last_error
                  for s in store.sends()}
        assert "no response" in (errors["1"] or "")
        now[0] += 10
        assert sender.step()
        assert states(store) == {"1": "pending", "2": "sent", "3": "sent", "4": "sent"}
        assert sorted(server.received) == [f"{SERIES}.{n}" for n in (2, 3, 4)]


# ------------------------------------------------------------------------------------------------
# a destination that is down: bounded association attempts


def _count_associations(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    calls: list[float] = []
    real = sender_module.send_files

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(time.monotonic())
        return real(*args, **kwargs)

    monkeypatch.setattr(sender_module, "send_files", counting)
    return calls


def test_down_destination_gets_one_association_per_retry_not_one_per_send(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a jitter drawn per send, the sends of one failed batch come due at different times
    and each gets its own association: N sends, N connection attempts per backoff period."""
    calls = _count_associations(monkeypatch)
    now = [1000.0]
    with Store.in_state_dir(tmp_path) as store:
        queue(tmp_path, store, [instance(n) for n in range(1, 41)], ["pacs"])
        sender = Sender(settings_for(tmp_path, peer_at(free_port())), store,
                        clock=lambda: now[0])  # the default jitter
        assert sender.step()
        assert len({s.next_try_at for s in store.sends()}) == 1  # the batch stays one batch
        while now[0] < 1100:
            now[0] += 0.25
            sender.step()
        # tries at 1000, ~1010, ~1031, ~1073 (10, 20, 40 s plus at most 10 %)
        assert len(calls) == 4
        assert {s.attempts for s in store.sends()} == {4}


def test_sends_due_at_scattered_times_share_the_next_try_of_a_down_destination(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sends queued at different times (several jobs during an outage) to a destination that
    refuses associations: once a try fails, the others wait for the next one instead of each
    opening its own association; a resend (attempts reset) is tried at once."""
    calls = _count_associations(monkeypatch)
    now = [1000.0]
    with Store.in_state_dir(tmp_path) as store:
        queue(tmp_path, store, [instance(n) for n in range(1, 11)], ["pacs"])
        for _ in range(5):  # five failed tries each, due 30 s apart
            store.record_send_outcomes(
                [SendOutcome(f"{SERIES}.{n}", "pacs", False, None, "down", 1000.0 + 30 * n)
                 for n in range(1, 11)], 900.0)
        sender = Sender(settings_for(tmp_path, peer_at(free_port())), store,
                        clock=lambda: now[0], jitter=0)
        while now[0] < 1400:
            now[0] += 1
            sender.step()
        assert len(calls) == 2  # at 1030 (one send due) and ~1350 (all of them)
        assert {s.attempts for s in store.sends()} == {6, 7}

        store.requeue_sends(now[0])  # qsmnode resend: not held back
        assert sender.step() and len(calls) == 3


def test_down_destination_does_not_hold_back_the_others(tmp_path: Path) -> None:
    now = [1000.0]
    with scp() as server, Store.in_state_dir(tmp_path) as store:
        down = peer_at(free_port(), "down")
        queue(tmp_path, store, [instance(n) for n in (1, 2, 3)], ["down", "pacs"])
        sender = Sender(settings_for(tmp_path, down, peer_at(server.port)), store,
                        clock=lambda: now[0], timeout_s=5)
        assert sender.step()
        assert set(states(store, "pacs").values()) == {"sent"}
        pending = store.sends(destination="down")
        assert {s.state for s in pending} == {"pending"}
        assert all("cannot connect to STORE@127.0.0.1" in (s.last_error or "")
                   for s in pending)


def test_peer_that_never_answers_the_association_request_times_out(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    now = [1000.0]
    try:
        with Store.in_state_dir(tmp_path) as store:
            queue(tmp_path, store, [instance(1)], ["pacs"])
            sender = Sender(settings_for(tmp_path, peer_at(listener.getsockname()[1])), store,
                            clock=lambda: now[0], timeout_s=0.5)
            started = time.monotonic()
            assert sender.step()
            assert time.monotonic() - started < 5
            (send,) = store.sends()
            assert send.state == "pending" and "timed out" in (send.last_error or "")
    finally:
        listener.close()


# ------------------------------------------------------------------------------------------------
# the store failing, the node dying: no duplicate storm, no loss


def test_store_failure_after_a_batch_does_not_resend_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch went out but its outcomes cannot be recorded (disk full): retrying the step
    must not send the batch again and again; the outcomes are recorded once the store is
    back."""
    now = [1000.0]
    with scp() as server, Store.in_state_dir(tmp_path) as store:
        queue(tmp_path, store, [instance(n) for n in range(1, 6)], ["pacs"])
        real = store.record_send_outcomes
        failures = [2]

        def record(outcomes: Any, at: float) -> int:
            if failures[0]:
                failures[0] -= 1
                raise sqlite3.OperationalError("database or disk is full")
            return real(outcomes, at)

        monkeypatch.setattr(store, "record_send_outcomes", record)
        sender = Sender(settings_for(tmp_path, peer_at(server.port)), store,
                        clock=lambda: now[0], timeout_s=5)
        for _ in range(4):
            with contextlib.suppress(Exception):
                sender.step()
            now[0] += 30
        assert sorted(server.received) == [f"{SERIES}.{n}" for n in range(1, 6)]
        assert set(states(store).values()) == {"sent"}
        assert {s.attempts for s in store.sends()} == {1}


def test_a_crash_mid_batch_resends_only_what_was_not_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outcomes are recorded as the batch goes, not only at its end: a node killed during a
    long batch resends the last moments of it, not the whole batch."""
    from pynetdicom.association import Association

    now = [1000.0]
    with scp() as server, Store.in_state_dir(tmp_path) as store:
        queue(tmp_path, store, [instance(n) for n in range(1, 31)], ["pacs"])
        real = Association.send_c_store
        calls = [0]

        class Killed(BaseException):
            pass

        def send_then_die(self: Association, *args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == 21:
                raise Killed
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Association, "send_c_store", send_then_die)
        sender = Sender(settings_for(tmp_path, peer_at(server.port)), store,
                        clock=lambda: now[0], timeout_s=5, record_every_s=0)
        with pytest.raises(Killed):
            sender.step()
        monkeypatch.setattr(Association, "send_c_store", real)
        assert list(states(store).values()).count("sent") == 20

        restarted = Sender(settings_for(tmp_path, peer_at(server.port)), store,
                           clock=lambda: now[0], timeout_s=5)
        assert restarted.step()
        assert set(states(store).values()) == {"sent"}
        assert sorted(server.received) == sorted(f"{SERIES}.{n}" for n in range(1, 31))


# ------------------------------------------------------------------------------------------------
# the sender thread: alive whatever happens, no tracebacks, no tight loop


def test_sender_thread_survives_store_errors_and_logs_them_without_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with scp() as server, Store.in_state_dir(tmp_path) as store:
        real = store.next_send_at
        failures = [1]

        def next_send_at(destinations: Any) -> float | None:
            if failures[0]:
                failures[0] -= 1
                raise sqlite3.OperationalError("disk I/O error")
            return real(destinations)

        monkeypatch.setattr(store, "next_send_at", next_send_at)
        sender = Sender(settings_for(tmp_path, peer_at(server.port)), store, timeout_s=5)
        sender.start()
        try:
            deadline = time.monotonic() + 5
            while failures[0] and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)
            queue(tmp_path, store, [instance(1)], ["pacs"], now=time.time())
            sender.wake()
            deadline = time.monotonic() + 10
            while not server.received and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.received == [f"{SERIES}.1"]
        finally:
            sender.stop()
    assert any("disk I/O error" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_held_destination_does_not_make_the_sender_spin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_associations(monkeypatch)
    with Store.in_state_dir(tmp_path) as store:
        queue(tmp_path, store, [instance(n) for n in range(1, 4)], ["pacs"], now=time.time())
        steps = [0]
        sender = Sender(settings_for(tmp_path, peer_at(free_port()), retry_initial_s=30.0),
                        store, timeout_s=5)
        real_step = sender.step

        def step() -> bool:
            steps[0] += 1
            return real_step()

        monkeypatch.setattr(sender, "step", step)
        sender.start()
        time.sleep(1.5)
        sender.stop()
    assert len(calls) == 1
    assert steps[0] <= 5


def test_tls_failure_is_one_clear_line_without_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """pynetdicom logs a failed TLS handshake with ``LOGGER.exception``: a traceback in the
    node's log for a peer's certificate or protocol problem."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)

    def not_tls() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"this is not TLS\r\n" * 16)
                time.sleep(0.5)

    thread = threading.Thread(target=not_tls, daemon=True)
    thread.start()
    caplog.set_level(logging.ERROR)
    path = tmp_path / "1.dcm"
    pydicom.dcmwrite(path, instance(1), enforce_file_format=True)
    files = [sender_module.OutgoingFile(path, path, MR_IMAGE, ExplicitVRLittleEndian)]
    peer = Peer("x", "STORE", "127.0.0.1", listener.getsockname()[1], "QSMNODE",
                ClientTLSConfig(True))
    try:
        with pytest.raises(AssociationFailed, match=r"cannot connect to .*SSL"):
            send_files(peer, files, timeout_s=5)
    finally:
        listener.close()
        thread.join(5)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


# ------------------------------------------------------------------------------------------------
# the outbox


def test_outbox_validates_a_file_before_writing_it(tmp_path: Path) -> None:
    """A result without SOP Class UID is refused before its file is written: no file without
    a row in the outbox."""
    state = tmp_path / "state"
    bad = instance(1)
    del bad.SOPClassUID
    source = tmp_path / "bad.dcm"
    pydicom.dcmwrite(source, bad, enforce_file_format=True)
    outbox = Outbox(state)
    with pytest.raises(ValueError, match="SOPClassUID"):
        outbox.import_files([source])
    assert not list(outbox.root.rglob("*.dcm"))


def test_the_sender_waits_as_long_as_configured(tmp_path: Path) -> None:
    """``[sender] timeout_s``: a large object on a busy archive may need more than a minute."""
    config = tmp_path / "node.toml"
    config.write_text("[sender]\ntimeout_s = 240\n")
    settings = load_settings(config, env={})
    with Store.in_state_dir(tmp_path) as store:
        assert Sender(settings, store).timeout_s == 240.0
        assert Sender(settings, store, timeout_s=5).timeout_s == 5.0
    config.write_text("[sender]\ntimeout_s = 0\n")
    with pytest.raises(ConfigError, match=r"sender\.timeout_s"):
        load_settings(config, env={})
