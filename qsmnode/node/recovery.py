"""Crash recovery: make the spool and the store agree at every start.

The spool file is the durable record of an acknowledged instance (see
:mod:`qsmnode.node.receiver`); its store row may be missing after a crash or a power loss.
:func:`recover` removes leftover temporary files, adds every spool file the store does not know
(reading it as the receiver read it when it came in), moves unreadable ones to the quarantine
folder, and reports stored instances whose file is missing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from qsmnode.dicom.wire import DatasetError, read_part10
from qsmnode.node.receiver import instance_record
from qsmnode.node.spool import Spool
from qsmnode.node.store import InstanceRecord, Store

log = logging.getLogger(__name__)

QUARANTINE_DIRNAME = "quarantine"


@dataclass(frozen=True)
class Recovery:
    """What :func:`recover` found: temp files removed, spool files added to the store, files
    quarantined (unreadable), and store entries whose file is missing."""

    temp_files_removed: int
    adopted: int
    quarantined: int
    missing: tuple[str, ...]


def recover(store: Store, spool: Spool, state_dir: Path) -> Recovery:
    """Make the spool and the store agree after a crash.

    A crash between a file's rename and its commit leaves a complete, fsynced file that the
    store does not know (and that the scanner was not told about); so does a power loss that
    takes the last instance rows, committed without fsync (acknowledged: see the module
    docstring). Either way the file is added to the store. Temporary files are deleted. A
    stored instance whose file is missing is reported.
    """
    removed = spool.remove_temp_files()
    known = store.instance_paths()
    adopted = quarantined = 0
    for path in sorted(spool.instance_files()):
        relative = path.relative_to(state_dir).as_posix()
        if relative in known:
            continue
        try:
            record = _record_of_file(path, relative)
        except Exception as exc:  # pydicom raises many types on a damaged file meta
            folder = state_dir / QUARANTINE_DIRNAME
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / path.name
            n = 1
            while target.exists():  # an earlier file of the same name stays too
                target = folder / f"{path.stem}.{n}{path.suffix}"
                n += 1
            os.replace(path, target)
            log.error("moved unreadable spool file %s to %s: %s", relative, target, exc)
            quarantined += 1
            continue
        store.add_instance(record)
        adopted += 1
    present = {p.relative_to(state_dir).as_posix() for p in spool.instance_files()}
    missing = tuple(sorted(known - present))
    for relative in missing:
        log.error("stored instance file is missing: %s", relative)
    if removed or adopted or quarantined:
        log.info("recovery: %d temporary files removed, %d spool files added to the store, "
                 "%d quarantined", removed, adopted, quarantined)
    return Recovery(removed, adopted, quarantined, missing)


def _record_of_file(path: Path, relative: str) -> InstanceRecord:
    """The record of a spool file. Its dataset is read as the receiver read it when it came in
    (:func:`inspect_dataset`, not pydicom's reader, which refuses some datasets the receiver
    accepts), so that whatever was acknowledged is adopted again."""
    instance = read_part10(path)
    header = instance.header
    sop_uid = header.sop_instance_uid or instance.media_sop_instance_uid
    sop_class = instance.media_sop_class_uid or header.sop_class_uid
    if (header.study_uid is None or header.series_uid is None or sop_uid is None
            or sop_class is None or path.stem != sop_uid):
        raise DatasetError("identifying UIDs missing or not matching the file name")
    return instance_record(header, sop_class, sop_uid, instance.transfer_syntax, relative,
                   instance.size, instance.source_ae or "", "", path.stat().st_mtime)
