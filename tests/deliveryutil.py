"""Test helpers for delivery: derived objects from the simulator's truth, until the pipeline
makes them itself.

:func:`truth_process` builds the derived objects of a loaded acquisition with
:func:`~qsmnode.dicom.derived.build_derived` from the small simulation's ground truth (χ, R2*,
M1 labels); :func:`truth_job` is the matching job function (``tests.deliveryutil:truth_job``),
:func:`truth_pipeline` the matching stand-in for :func:`qsmnode.pipeline.process_acquisition`,
and ``python -m tests.deliveryutil process DIR --out DIR [--send DEST]`` is ``qsmnode process``
with it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from qsmnode.node.association import Peer
from qsmnode.node.config import DestinationConfig, SenderConfig, Settings
from tests.nodeutil import Node, toml_value, wait_for
from tests.orthanc import Orthanc

ALGORITHM_VERSION = "0.1-test"
CREATED = dt.datetime(2024, 5, 17, 12, 0, 0)




@contextlib.contextmanager
def rejecting_peer(ae_title: str) -> Iterator[int]:
    """A pynetdicom SCP (Verification and Study Root FIND) that rejects every association
    not called ``ae_title`` (before it looks at the contexts); yields its port."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

    ae = AE(ae_title=ae_title)
    ae.require_called_aet = True
    ae.add_supported_context(Verification)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def slow_requestor(monkeypatch: Any, delay_s: float = 0.5) -> None:
    """Make pynetdicom's requesting thread pause after it sends A-ASSOCIATE-RQ, so the DUL
    thread has received the answer (and, for a rejection, closed the connection) before the
    requestor looks: the interleaving a loaded machine produces by chance."""
    from pynetdicom.acse import ACSE

    send_request = ACSE.send_request

    def slow(self: Any) -> None:
        send_request(self)
        time.sleep(delay_s)

    monkeypatch.setattr(ACSE, "send_request", slow)


def kill(server: Orthanc) -> None:
    """Stop Orthanc at once (a clean stop takes seconds; the tests need no clean stop)."""
    server.kill()


def orthanc_series(server: Orthanc) -> dict[int, int]:
    """Series number → instance count, as Orthanc stores them."""
    return {int(s["MainDicomTags"]["SeriesNumber"]): len(s["Instances"])
            for s in server.series()}


def orthanc_study_uids(server: Orthanc) -> set[str]:
    return {s["MainDicomTags"]["StudyInstanceUID"] for s in server.studies()}


def add_destination(node: Node, server: Orthanc, name: str = "pacs") -> None:
    """Append a ``[[destinations]]`` table for ``server`` to the node's configuration."""
    table = {"name": name, "ae_title": server.ae_title, "host": "127.0.0.1",
             "port": server.dicom_port, "calling_ae_title": "QSMNODE"}
    lines = ["", "[[destinations]]", *(f"{k} = {toml_value(v)}" for k, v in table.items())]
    node.config.write_text(node.config.read_text() + "\n".join(lines) + "\n")


def delivery(node: Node) -> dict[str, Any]:
    report = node.status_json()
    (destination,) = report["delivery"]["destinations"]
    return destination  # type: ignore[no-any-return]


def wait_delivered(node: Node, n: int, timeout_s: float = 90.0) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        counts = node.read(lambda s: s.counts().get("sends", {}), {})
        if counts.get("sent") == n and not counts.get("pending") and not counts.get("failed"):
            return delivery(node)
        return None

    return wait_for(done, f"{n} sends delivered", timeout_s, 0.25, node.log)


def truth_process(loaded: Any, files: Sequence[str]) -> tuple[dict[str, Any], list[Any]]:
    """The derived objects of the small simulated study, from its truth."""
    from qsmnode.dicom.derived import build_derived, source_reader
    from qsmnode.node.jobs import JobError
    from tests.derivedutil import m1_from_truth
    from tests.nodeutil import small_simulation

    sim = small_simulation()
    if tuple(loaded.gre.shape) != tuple(sim.truth.chi_ppm.shape):
        raise JobError(f"not the small simulated study: shape {loaded.gre.shape}")
    datasets = build_derived(loaded, sim.truth.chi_ppm, sim.truth.r2star_per_s,
                             m1_from_truth(sim), source_reader(files), ALGORITHM_VERSION,
                             CREATED)
    return {"derived": len(datasets)}, datasets


def truth_pipeline(loaded: Any, source_files: Sequence[str | Path],
                   **settings: object) -> Any:
    """:func:`truth_process` in the place of :func:`qsmnode.pipeline.process_acquisition`
    (``qsmnode process``): a :class:`~qsmnode.pipeline.PipelineResult` with the truth's
    derived objects; :class:`~qsmnode.pipeline.PipelineError` for another study."""
    from qsmnode.node.jobs import JobError
    from qsmnode.pipeline import PipelineError, PipelineResult, check_acquisition

    try:
        _, datasets = truth_process(loaded, [str(f) for f in source_files])
    except JobError as exc:
        raise PipelineError(str(exc)) from None
    return PipelineResult(check_acquisition(loaded), (), datasets=tuple(datasets))


def truth_job(spec: Any) -> dict[str, Any]:
    """A job function: the default one, with :func:`truth_process` as the pipeline."""
    from qsmnode.node.jobs import load_job_acquisition, write_job_outputs

    loaded = load_job_acquisition(spec)
    result, datasets = truth_process(loaded, spec.files)
    write_job_outputs(spec, datasets)
    return result


class DroppingStoreSCP:
    """A pynetdicom Storage SCP that drops the connection (no response, the socket shut) at
    the ``drop_at``-th C-STORE of each of its first ``drops`` associations; it keeps the SOP
    Instance UIDs it acknowledged."""

    def __init__(self, drop_at: int, drops: int) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.drop_at, self.drops = drop_at, drops
        self.stored: set[str] = set()
        self.associations = 0
        self._count = 0
        ae = AE(ae_title="QSMNODE")
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, context.transfer_syntax)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False,
            evt_handlers=[(evt.EVT_ACCEPTED, self._accepted), (evt.EVT_C_STORE, self._store)])

    def _accepted(self, event: object) -> None:
        self.associations += 1
        self._count = 0

    def _store(self, event: object) -> int:
        self._count += 1
        if self.associations <= self.drops and self._count == self.drop_at:
            event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]
            return 0xA700  # never reaches the SCU
        self.stored.add(str(event.request.AffectedSOPInstanceUID))  # type: ignore[attr-defined]
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


def _main() -> int:
    from qsmnode.commands.process import run_process

    parser = argparse.ArgumentParser(description="qsmnode process with truth_process")
    parser.add_argument("command", choices=["process"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--send")
    parser.add_argument("--config", type=Path)
    args = parser.parse_args()
    return run_process(args.folder, args.out, args.send, args.config,
                       processor=truth_pipeline)


if __name__ == "__main__":
    raise SystemExit(_main())


def settings_for(state_dir: Path, *peers: Peer, **sender: float) -> Settings:
    """Settings with ``state_dir``, one destination per peer and ``[sender]`` values (retries
    after 1 s, at most 4 s, unless given)."""
    base = Settings()
    return replace(
        base,
        paths=replace(base.paths, state_dir=state_dir),
        destinations=tuple(DestinationConfig(p.name, p.ae_title, p.host, p.port,
                                             p.calling_ae_title, p.tls) for p in peers),
        sender=SenderConfig(**{"retry_initial_s": 1.0, "retry_max_s": 4.0, **sender}),
    )
