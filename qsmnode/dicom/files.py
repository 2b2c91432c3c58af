"""Datasets as DICOM Part 10 files, written atomically.

:func:`write_datasets` writes datasets to ``<folder>/<study>/<series>/<sop>.dcm``: each file
to a temporary name in its final folder, fsynced, renamed into place, and the folder fsynced;
so a ``.dcm`` file there is always complete. ``qsmnode process --out`` writes its derived
objects with it, and so does a worker child into its attempt folder (the node then moves them
into the outbox, :mod:`qsmnode.node.outbox`, which encodes with :func:`encode` too).

Only UIDs made of digits and dots (at most 64 characters) name files, so a dataset cannot steer
a path out of the folder.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

INSTANCE_SUFFIX = ".dcm"
TEMP_SUFFIX = ".tmp"

_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")


def encode(ds: Dataset) -> bytes:
    """A dataset as a DICOM Part 10 file (preamble, file meta, data set)."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _uid(ds: Dataset, keyword: str) -> str:
    """A UID of ``ds`` fit to name a file. Raises ValueError when absent or not a UID."""
    value = ds.get(keyword)
    if not value:
        raise ValueError(f"derived dataset without {keyword}")
    text = str(value)
    if len(text) > 64 or not _UID.fullmatch(text):
        raise ValueError(f"invalid {keyword} {text[:80]!r}")
    return text


def instance_path(folder: Path, ds: Dataset) -> Path:
    """Where ``ds`` goes under ``folder``: ``<study>/<series>/<sop>.dcm``.

    Raises:
        ValueError: a UID is absent or not a valid UID.
    """
    return (Path(folder) / _uid(ds, "StudyInstanceUID") / _uid(ds, "SeriesInstanceUID")
            / f"{_uid(ds, 'SOPInstanceUID')}{INSTANCE_SUFFIX}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``: temporary name in the same folder, fsync, rename (an
    existing file is replaced atomically), fsync of the folder. The folder is created when
    needed. Leaves no temporary file behind when it fails.

    Raises:
        OSError: the file could not be written (the message names it).
    """
    folder = path.parent
    temp = folder / f".{path.stem}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
        _fsync_dir(folder)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
        raise


def write_datasets(datasets: Iterable[Dataset], folder: Path) -> list[Path]:
    """Write datasets as Part 10 files to ``<folder>/<study>/<series>/<sop>.dcm``, each
    atomically (:func:`write_atomically`); return the paths in the order given.

    Raises:
        ValueError: a dataset without valid UIDs.
        OSError: a file could not be written.
    """
    paths = []
    for ds in datasets:
        path = instance_path(folder, ds)
        write_atomically(path, encode(ds))
        paths.append(path)
    return paths
