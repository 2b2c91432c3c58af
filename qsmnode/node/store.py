"""The store: the node's durable state in one SQLite file (WAL mode) under the state directory.

Every state change is one transaction, committed with ``synchronous=FULL`` before the call
returns, so a change the caller was told about survives a crash or power loss.

Schema (version 1, in ``PRAGMA user_version``)::

    series(series_uid PK, study_uid, series_number, modality, sop_class_uid,
           series_description, expected_count, received_count,
           first_received_at, last_received_at, state 'open'|'complete', completed_at)
    instances(sop_instance_uid PK, sop_class_uid, study_uid, series_uid -> series,
              series_number, instance_number, number_of_frames, images_in_acquisition,
              transfer_syntax_uid, path, size, calling_ae, peer_address, received_at)

Times are Unix seconds (float). ``instances.path`` is relative to the state directory.
``received_count`` counts distinct instances; a late instance of a complete series updates
``last_received_at`` (so ``last_received_at > completed_at``) but leaves the state to the tracker.

Later schema versions append to :data:`MIGRATIONS`; opening a store applies the missing ones,
each in one transaction. The API is small and has no ORM: records in, records out.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

STORE_FILENAME = "qsmnode.sqlite3"

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE series (
        series_uid         TEXT PRIMARY KEY,
        study_uid          TEXT NOT NULL,
        series_number      INTEGER,
        modality           TEXT,
        sop_class_uid      TEXT NOT NULL,
        series_description TEXT,
        expected_count     INTEGER,
        received_count     INTEGER NOT NULL DEFAULT 0,
        first_received_at  REAL NOT NULL,
        last_received_at   REAL NOT NULL,
        state              TEXT NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'complete')),
        completed_at       REAL
    );
    CREATE INDEX series_study ON series (study_uid);
    CREATE INDEX series_state ON series (state);
    CREATE TABLE instances (
        sop_instance_uid      TEXT PRIMARY KEY,
        sop_class_uid         TEXT NOT NULL,
        study_uid             TEXT NOT NULL,
        series_uid            TEXT NOT NULL REFERENCES series (series_uid),
        series_number         INTEGER,
        instance_number       INTEGER,
        number_of_frames      INTEGER,
        images_in_acquisition INTEGER,
        transfer_syntax_uid   TEXT NOT NULL,
        path                  TEXT NOT NULL UNIQUE,
        size                  INTEGER NOT NULL,
        calling_ae            TEXT NOT NULL,
        peer_address          TEXT NOT NULL,
        received_at           REAL NOT NULL
    );
    CREATE INDEX instances_series ON instances (series_uid);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(Exception):
    """The store cannot be opened or used (the message names the file and the problem)."""


@dataclass(frozen=True)
class InstanceRecord:
    """One received instance, as recorded. ``path`` is relative to the state directory."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    path: str
    size: int
    calling_ae: str
    peer_address: str
    received_at: float
    series_number: int | None = None
    instance_number: int | None = None
    number_of_frames: int | None = None
    images_in_acquisition: int | None = None
    modality: str | None = None
    series_description: str | None = None


@dataclass(frozen=True)
class SeriesRecord:
    """One series as recorded."""

    series_uid: str
    study_uid: str
    series_number: int | None
    modality: str | None
    sop_class_uid: str
    series_description: str | None
    expected_count: int | None
    received_count: int
    first_received_at: float
    last_received_at: float
    state: str
    completed_at: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_INSTANCE_COLUMNS = tuple(
    f.name for f in fields(InstanceRecord) if f.name not in ("modality", "series_description")
)
_SERIES_COLUMNS = tuple(f.name for f in fields(SeriesRecord))


class Store:
    """The SQLite store. Thread-safe: one connection, serialised by a lock.

    ``readonly=True`` opens an existing store without writing (no migrations), for status
    readers running beside the node.
    """

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            if readonly:
                if not self.path.is_file():
                    raise StoreError(f"{self.path}: no store here (has the node run yet?)")
                uri = f"{self.path.absolute().as_uri()}?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, isolation_level=None,
                                           check_same_thread=False, timeout=10.0)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(self.path, isolation_level=None,
                                           check_same_thread=False, timeout=10.0)
                mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise StoreError(f"{self.path}: cannot switch to WAL mode (got {mode})")
                self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.row_factory = sqlite3.Row
            version = self.schema_version()
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: schema version {version} is newer than this qsmnode "
                    f"understands ({SCHEMA_VERSION}); upgrade qsmnode"
                )
            if not readonly:
                self._migrate(version)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    @classmethod
    def in_state_dir(cls, state_dir: Path, *, readonly: bool = False) -> Store:
        """The store of a node whose state directory is ``state_dir``."""
        return cls(Path(state_dir) / STORE_FILENAME, readonly=readonly)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, rolled back on error)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _migrate(self, version: int) -> None:
        for number in range(version, SCHEMA_VERSION):
            with self.transaction() as db:
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {number + 1}")

    # ---------------------------------------------------------------------------------- instances

    def add_instance(self, record: InstanceRecord) -> bool:
        """Record a received instance (and its series) in one transaction.

        Returns False, changing nothing, when the SOP Instance UID is already recorded.
        """
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO series (series_uid, study_uid, series_number, modality, "
                "sop_class_uid, series_description, first_received_at, last_received_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (record.series_uid, record.study_uid, record.series_number, record.modality,
                 record.sop_class_uid, record.series_description, record.received_at,
                 record.received_at),
            )
            cursor = db.execute(
                f"INSERT OR IGNORE INTO instances ({', '.join(_INSTANCE_COLUMNS)}) "
                f"VALUES ({', '.join('?' for _ in _INSTANCE_COLUMNS)})",
                tuple(getattr(record, name) for name in _INSTANCE_COLUMNS),
            )
            if cursor.rowcount == 0:
                return False
            db.execute(
                "UPDATE series SET received_count = received_count + 1, "
                "last_received_at = max(last_received_at, ?) WHERE series_uid = ?",
                (record.received_at, record.series_uid),
            )
            return True

    def instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        """The recorded instance with this SOP Instance UID, if any."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(_INSTANCE_COLUMNS)} FROM instances WHERE sop_instance_uid = ?",
                (sop_instance_uid,),
            ).fetchone()
        return None if row is None else InstanceRecord(**dict(row))

    def instances(self, series_uid: str | None = None) -> list[InstanceRecord]:
        """Recorded instances, of one series or all, in order of arrival."""
        sql = f"SELECT {', '.join(_INSTANCE_COLUMNS)} FROM instances"
        args: tuple[str, ...] = ()
        if series_uid is not None:
            sql += " WHERE series_uid = ?"
            args = (series_uid,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY received_at, rowid", args).fetchall()
        return [InstanceRecord(**dict(row)) for row in rows]

    def instance_paths(self) -> set[str]:
        """The ``path`` of every recorded instance (relative to the state directory)."""
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT path FROM instances")}

    def count_instances(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM instances").fetchone()[0])

    # ------------------------------------------------------------------------------------- series

    def series(self, state: str | None = None) -> list[SeriesRecord]:
        """Recorded series (all, or those in ``state``), oldest first."""
        sql = f"SELECT {', '.join(_SERIES_COLUMNS)} FROM series"
        args: tuple[str, ...] = ()
        if state is not None:
            sql += " WHERE state = ?"
            args = (state,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY first_received_at, rowid", args).fetchall()
        return [SeriesRecord(**dict(row)) for row in rows]

    def get_series(self, series_uid: str) -> SeriesRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(_SERIES_COLUMNS)} FROM series WHERE series_uid = ?",
                (series_uid,),
            ).fetchone()
        return None if row is None else SeriesRecord(**dict(row))

    def set_expected_count(self, series_uid: str, count: int | None) -> None:
        """Record how many instances the series is expected to hold (None: unknown)."""
        with self.transaction() as db:
            db.execute("UPDATE series SET expected_count = ? WHERE series_uid = ?",
                       (count, series_uid))

    def mark_series_complete(self, series_uid: str, at: float | None = None) -> bool:
        """Mark an open series complete; False when it was not open."""
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE series SET state = 'complete', completed_at = ? "
                "WHERE series_uid = ? AND state = 'open'",
                (time.time() if at is None else at, series_uid),
            )
            return cursor.rowcount == 1

    def summary(self) -> dict[str, int]:
        """Counts for status displays: series (total, open, complete) and instances."""
        with self._lock:
            total, open_, complete = self._db.execute(
                "SELECT count(*), coalesce(sum(state = 'open'), 0), "
                "coalesce(sum(state = 'complete'), 0) FROM series"
            ).fetchone()
            instances, size = self._db.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM instances"
            ).fetchone()
        return {
            "series": int(total), "series_open": int(open_), "series_complete": int(complete),
            "instances": int(instances), "bytes": int(size),
        }
