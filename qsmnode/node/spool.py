"""The spool: received instances as files, written durably.

Layout: ``<root>/<study_uid>/<series_uid>/<sop_instance_uid>.dcm``. A file is first written to a
temporary name in its final folder (``.<sop_uid>.<random>.tmp``), fsynced, renamed into place,
and the folder is fsynced; the folder's entry and its parents' are fsynced too, once per
process (whoever made them). So after a crash a ``.dcm`` file in the spool is always complete,
and a leftover ``.tmp`` file is garbage.

Only UIDs made of digits and dots (at most 64 characters) name files, so a peer cannot steer a
path out of the spool.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

MIB = 1024 * 1024
TEMP_SUFFIX = ".tmp"
INSTANCE_SUFFIX = ".dcm"

_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")


def is_uid(text: str) -> bool:
    """True for a syntactically valid DICOM UID: digits and dots, 1-64 characters."""
    return len(text) <= 64 and bool(_UID.fullmatch(text))


class SpoolError(OSError):
    """Writing to the spool failed (the message names the file and the system error)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_IOV_MAX = 1024  # buffers per writev call (the Linux limit)
_DURABLE_FOLDERS_KEPT = 4096  # folders remembered as fsynced into their parents


def _write_all(fd: int, chunks: Iterable[bytes | memoryview]) -> int:
    """Write ``chunks`` in order with as few system calls as possible (one ``writev`` when
    the kernel takes everything at once), without joining them first; return the size."""
    views = [view for chunk in chunks if (view := memoryview(chunk).cast("B"))]
    size = sum(len(view) for view in views)
    while views:
        written = os.writev(fd, views[:_IOV_MAX])
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if written:
            views[0] = views[0][written:]
    return size


class Spool:
    """The folder of received instances, with a free-space floor.

    ``min_free_bytes``: :meth:`has_room` is false when writing would leave less free space than
    this on the spool's file system.
    """

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self._durable: set[Path] = set()  # folders whose entries this process has fsynced
        self._ensure_dir(self.root)

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Final path of an instance. Raises ValueError for a UID that is not a valid UID."""
        for name, uid in (("study", study_uid), ("series", series_uid), ("SOP instance", sop_uid)):
            if not is_uid(uid):
                raise ValueError(f"invalid {name} UID {uid[:80]!r}")
        return self.root / study_uid / series_uid / f"{sop_uid}{INSTANCE_SUFFIX}"

    def free_bytes(self) -> int:
        """Free space (for unprivileged users) on the spool's file system."""
        return shutil.disk_usage(self.root).free

    def has_room(self, nbytes: int) -> bool:
        """True when ``nbytes`` can be written and the free-space floor still holds."""
        return self.free_bytes() - nbytes >= self.min_free_bytes

    def write(self, path: Path, chunks: Iterable[bytes | memoryview]) -> int:
        """Write ``chunks`` to ``path`` (from :meth:`path_for`) durably; return the size.

        Temporary name, fsync of the file, rename, fsync of the folder. An existing file at
        ``path`` is replaced atomically. Raises :class:`SpoolError`.
        """
        folder = path.parent
        temp = folder / f".{path.stem}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            self._ensure_dir(folder)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                size = _write_all(fd, chunks)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, path)
            _fsync_dir(folder)
        except BaseException as exc:
            # whatever failed, leave no temporary file; a failing clean-up (the folder itself
            # unreachable) must not replace the error that names the cause
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise SpoolError(exc.errno,
                                 f"cannot write {path}: {exc.strerror or exc}") from exc
            raise
        return size

    def instance_files(self) -> Iterator[Path]:
        """Every complete instance file in the spool."""
        yield from self.root.glob(f"*/*/*{INSTANCE_SUFFIX}")

    def remove_temp_files(self) -> int:
        """Delete temporary files left by an interrupted write; return how many."""
        count = 0
        for temp in self.root.glob(f"*/*/.*{TEMP_SUFFIX}"):
            temp.unlink(missing_ok=True)
            count += 1
        return count

    def _ensure_dir(self, folder: Path) -> None:
        """Create ``folder`` and missing parents, and make sure that its entry and its parents'
        entries, up to the spool itself, are durable: fsynced into their parents.

        A folder that already exists is not durable for that: another association may have
        just made it and not yet fsynced its parent, or an earlier run may have died in
        between. So each entry is fsynced once by this process before a file in it is
        acknowledged (remembered in ``_durable``; forgetting only costs fsyncs again).
        """
        if folder in self._durable and folder.is_dir():
            return
        missing = []
        current = folder
        while not current.is_dir():
            missing.append(current)
            current = current.parent
        for new in reversed(missing):
            with contextlib.suppress(FileExistsError):  # made concurrently by another association
                new.mkdir()
        chain = []  # the folder and its ancestors up to the spool, not yet known durable
        current = folder
        while current in missing or current not in self._durable:
            chain.append(current)
            if current == self.root or current == current.parent:
                break
            current = current.parent
        if len(self._durable) > _DURABLE_FOLDERS_KEPT:
            self._durable.clear()
        for entry in reversed(chain):  # from the top: an entry is durable once its parent is
            _fsync_dir(entry.parent)
            self._durable.add(entry)
