"""The outbox: derived instances as files, written durably and recorded before any send.

Layout: ``<state_dir>/outbox/<study_uid>/<series_uid>/<sop_instance_uid>.dcm``, written with the
spool's primitive (:meth:`qsmnode.node.spool.Spool.write`: temporary name, fsync, rename, fsync
of the folder). :meth:`Outbox.add` writes every file first and then records them all, with a
pending send to each configured destination, in one store transaction; a job's results are
recorded in the transaction that marks the job done (:meth:`Outbox.import_files` then
:meth:`qsmnode.node.store.Store.finish_job`). So the sender only ever sees complete files, and
a crash between writing and recording leaves files that no row names: :meth:`Outbox.recover`
deletes them at start, and the job, not done, runs again and writes them anew (deterministic
UIDs: the same names).

Datasets are encoded as Part 10 files with :func:`qsmnode.dicom.files.encode`. Writing them to
any other folder in the same layout (the worker child's job folder, from which the parent,
which owns the store, moves them into the outbox; ``qsmnode process --out``) is
:func:`qsmnode.dicom.files.write_datasets`, at the DICOM edge (also importable from here).

Delivered files do not stay forever: retention (:mod:`qsmnode.node.retention`) removes a
study's outbox files once every destination has them and they are ``[retention] outbox_days``
old (or sooner, in an emergency clean), keeping the rows marked as pruned; :meth:`Outbox.recover`
deletes any file whose row is pruned.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from qsmnode.dicom.files import encode, write_datasets
from qsmnode.node.spool import Spool
from qsmnode.node.store import OutboxRecord, Store

log = logging.getLogger(__name__)

OUTBOX_DIRNAME = "outbox"
__all__ = ["OUTBOX_DIRNAME", "Outbox", "encode", "write_datasets"]


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if not value:
        raise ValueError(f"derived dataset without {keyword}")
    return str(value)


def _int(value: object) -> int | None:
    try:
        return None if value is None or value == "" else int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


class Outbox:
    """The outbox of the node whose state directory is ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.root = self.state_dir / OUTBOX_DIRNAME
        self._files = Spool(self.root)

    def path(self, record: OutboxRecord) -> Path:
        """The file of a recorded instance."""
        return self.state_dir / record.path

    def _write(self, data: bytes, job_id: int | None, now: float) -> OutboxRecord:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        sop_uid, study_uid = _text(ds, "SOPInstanceUID"), _text(ds, "StudyInstanceUID")
        series_uid = _text(ds, "SeriesInstanceUID")
        # everything the record needs is read before the file is written: a result that
        # cannot be recorded leaves no file behind
        sop_class_uid = _text(ds, "SOPClassUID")
        transfer_syntax_uid = ds.file_meta.get("TransferSyntaxUID")
        if not transfer_syntax_uid:
            raise ValueError("derived dataset without file meta TransferSyntaxUID")
        path = self._files.path_for(study_uid, series_uid, sop_uid)
        size = self._files.write(path, [data])
        return OutboxRecord(
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class_uid,
            study_uid=study_uid,
            series_uid=series_uid,
            transfer_syntax_uid=str(transfer_syntax_uid),
            path=path.relative_to(self.state_dir).as_posix(),
            size=size,
            created_at=now,
            series_number=_int(ds.get("SeriesNumber")),
            modality=str(ds.get("Modality") or "") or None,
            job_id=job_id,
        )

    def write(self, datasets: Iterable[Dataset], job_id: int | None = None,
              now: float | None = None) -> list[OutboxRecord]:
        """Write datasets into the outbox durably; return their records (not recorded yet)."""
        at = time.time() if now is None else now
        return [self._write(encode(ds), job_id, at) for ds in datasets]

    def import_files(self, paths: Sequence[Path], job_id: int | None = None,
                     now: float | None = None) -> list[OutboxRecord]:
        """Copy DICOM files (a worker child's results) into the outbox durably; return their
        records (not recorded yet), in the order given."""
        at = time.time() if now is None else now
        return [self._write(Path(path).read_bytes(), job_id, at) for path in paths]

    def add(self, store: Store, datasets: Iterable[Dataset], destinations: Sequence[str],
            job_id: int | None = None, now: float | None = None) -> list[OutboxRecord]:
        """Write datasets into the outbox, then record them with a pending send to each of
        ``destinations`` in one transaction; return the records."""
        at = time.time() if now is None else now
        records = self.write(datasets, job_id, at)
        store.record_outbox(records, destinations, at)
        return records

    def recover(self, store: Store) -> tuple[int, int]:
        """Delete what a crash left: temporary files, and files no outbox row names (their
        job is not done and runs again). Returns (temporary, unrecorded) counts."""
        temporary = self._files.remove_temp_files()
        recorded = store.outbox_paths()
        unrecorded = 0
        for path in self._files.instance_files():
            if path.relative_to(self.state_dir).as_posix() not in recorded:
                path.unlink(missing_ok=True)
                unrecorded += 1
        if temporary or unrecorded:
            log.warning("outbox: removed %d temporary and %d unrecorded files left by an "
                        "interrupted run", temporary, unrecorded)
        return temporary, unrecorded

