"""The store's SQLite file: the connection, its lock, write transactions, and the schema.

The schema is written once, in :data:`MIGRATIONS`: entry ``n`` takes the file from version
``n`` to ``n + 1`` (``PRAGMA user_version``). Opening a store for writing applies the missing
ones, each in one transaction; a read-only opening (status readers beside the node) migrates
nothing, so the other modules check :attr:`StoreConnection.version` before using a later table
or column. Later versions append to :data:`MIGRATIONS`.

Conventions the DDL does not show: times are Unix seconds (float); ``path`` columns are
relative to the state directory; ``series_uids``, ``summary``, ``plan``, ``result`` and
``notes`` hold JSON. What each table means is said by the module that keeps it: ``series`` and
``instances`` :mod:`~qsmnode.node.store.ingest`; ``acquisitions``, ``problems`` and
``studies`` :mod:`~qsmnode.node.store.grouping`; ``jobs`` :mod:`~qsmnode.node.store.jobs`;
``outbox`` and ``sends`` :mod:`~qsmnode.node.store.delivery`; ``prunings``
:mod:`~qsmnode.node.store.retention`; ``hl7_destinations`` and ``hl7_messages``
:mod:`~qsmnode.node.store.hl7`. The status readers (metrics, health check, status page) read
through :mod:`~qsmnode.node.store.queries`.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Self

from qsmnode.node.audit import NULL_AUDIT, AuditLog
from qsmnode.node.store.records import SERIES_COLUMNS, SERIES_COLUMNS_V1, SERIES_COLUMNS_V2

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
    """
    ALTER TABLE series ADD COLUMN opened_at REAL;
    ALTER TABLE series ADD COLUMN completed_count INTEGER;
    ALTER TABLE series ADD COLUMN completion TEXT
        CHECK (completion IN ('count', 'quiet', 'max_wait'));
    ALTER TABLE series ADD COLUMN grouped_at REAL;
    CREATE INDEX instances_study ON instances (study_uid);
    CREATE TABLE acquisitions (
        id           INTEGER PRIMARY KEY,
        study_uid    TEXT NOT NULL,
        series_key   TEXT NOT NULL UNIQUE,
        series_uids  TEXT NOT NULL,
        state        TEXT NOT NULL CHECK (state IN ('accepted', 'ignored')),
        reason       TEXT,
        summary      TEXT NOT NULL,
        created_at   REAL NOT NULL,
        updated_at   REAL NOT NULL
    );
    CREATE INDEX acquisitions_study ON acquisitions (study_uid);
    CREATE TABLE problems (
        id           INTEGER PRIMARY KEY,
        study_uid    TEXT NOT NULL,
        series_uids  TEXT NOT NULL,
        reason       TEXT NOT NULL,
        created_at   REAL NOT NULL,
        resolved_at  REAL
    );
    CREATE INDEX problems_study ON problems (study_uid);
    CREATE TABLE jobs (
        id               INTEGER PRIMARY KEY,
        acquisition_id   INTEGER NOT NULL UNIQUE REFERENCES acquisitions (id),
        state            TEXT NOT NULL DEFAULT 'queued'
                         CHECK (state IN ('queued', 'running', 'done', 'failed')),
        attempts         INTEGER NOT NULL DEFAULT 0,
        lease_owner      TEXT,
        lease_expires_at REAL,
        last_error       TEXT,
        result           TEXT,
        created_at       REAL NOT NULL,
        updated_at       REAL NOT NULL,
        started_at       REAL,
        finished_at      REAL
    );
    CREATE INDEX jobs_state ON jobs (state);
    """,
    """
    CREATE TABLE outbox (
        sop_instance_uid    TEXT PRIMARY KEY,
        sop_class_uid       TEXT NOT NULL,
        study_uid           TEXT NOT NULL,
        series_uid          TEXT NOT NULL,
        transfer_syntax_uid TEXT NOT NULL,
        series_number       INTEGER,
        modality            TEXT,
        job_id              INTEGER REFERENCES jobs (id),
        path                TEXT NOT NULL UNIQUE,
        size                INTEGER NOT NULL,
        created_at          REAL NOT NULL
    );
    CREATE INDEX outbox_study ON outbox (study_uid);
    CREATE INDEX outbox_job ON outbox (job_id);
    CREATE TABLE sends (
        sop_instance_uid TEXT NOT NULL REFERENCES outbox (sop_instance_uid),
        destination      TEXT NOT NULL,
        state            TEXT NOT NULL DEFAULT 'pending'
                         CHECK (state IN ('pending', 'sent', 'failed')),
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_try_at      REAL NOT NULL,
        last_status      INTEGER,
        last_error       TEXT,
        last_try_at      REAL,
        sent_at          REAL,
        created_at       REAL NOT NULL,
        updated_at       REAL NOT NULL,
        PRIMARY KEY (sop_instance_uid, destination)
    );
    CREATE INDEX sends_due ON sends (state, next_try_at);
    CREATE INDEX sends_destination ON sends (destination, state);
    """,
    """
    ALTER TABLE instances ADD COLUMN pruned_at REAL;
    ALTER TABLE outbox ADD COLUMN pruned_at REAL;
    CREATE TABLE prunings (
        id         INTEGER PRIMARY KEY,
        study_uid  TEXT NOT NULL,
        kind       TEXT NOT NULL CHECK (kind IN ('spool', 'outbox')),
        reason     TEXT NOT NULL CHECK (reason IN ('age', 'emergency')),
        instances  INTEGER NOT NULL,
        bytes      INTEGER NOT NULL,
        at         REAL NOT NULL
    );
    CREATE INDEX prunings_study ON prunings (study_uid);
    CREATE INDEX outbox_pruned ON outbox (pruned_at);
    """,
    """
    ALTER TABLE series ADD COLUMN passed_over TEXT;
    CREATE TABLE studies (
        study_uid          TEXT PRIMARY KEY,
        accession_number   TEXT,
        study_date         TEXT,
        study_time         TEXT,
        study_description  TEXT,
        updated_at         REAL NOT NULL
    );
    """,
    """
    CREATE TABLE hl7_destinations (
        name        TEXT PRIMARY KEY,
        since       REAL NOT NULL
    );
    CREATE TABLE hl7_messages (
        control_id       TEXT NOT NULL,
        destination      TEXT NOT NULL,
        job_id           INTEGER NOT NULL REFERENCES jobs (id),
        study_uid        TEXT NOT NULL,
        message          TEXT,
        notes            TEXT NOT NULL DEFAULT '[]',
        abnormal         TEXT,
        state            TEXT NOT NULL DEFAULT 'pending'
                         CHECK (state IN ('pending', 'sent', 'failed')),
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_try_at      REAL NOT NULL,
        last_ack_code    TEXT,
        last_error       TEXT,
        last_try_at      REAL,
        sent_at          REAL,
        created_at       REAL NOT NULL,
        updated_at       REAL NOT NULL,
        PRIMARY KEY (control_id, destination),
        UNIQUE (job_id, destination)
    );
    CREATE INDEX hl7_messages_due ON hl7_messages (state, next_try_at);
    CREATE INDEX hl7_messages_study ON hl7_messages (study_uid);
    """,
    """
    ALTER TABLE acquisitions ADD COLUMN plan TEXT;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(Exception):
    """The store cannot be opened or used (the message names the file and the problem)."""


class StoreConnection:
    """The connection to the store's file, shared by the aggregate mixins that
    :class:`~qsmnode.node.store.Store` combines. Thread-safe: one connection, serialised by a
    lock (``_lock``); every write is one :meth:`transaction`.

    ``readonly=True`` opens an existing store without writing (no migrations). ``audit``:
    where the state changes are also written as events, after their commit
    (:mod:`qsmnode.node.audit`; by default nowhere).
    """

    def __init__(self, path: Path, *, readonly: bool = False,
                 audit: AuditLog = NULL_AUDIT) -> None:
        self.path = Path(path)
        self.audit = audit
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
                version = SCHEMA_VERSION
            self._version = version
            self._series_columns = (SERIES_COLUMNS if version >= 5 else SERIES_COLUMNS_V2
                                    if version >= 2 else SERIES_COLUMNS_V1)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    @classmethod
    def in_state_dir(cls, state_dir: Path, *, readonly: bool = False,
                     audit: AuditLog = NULL_AUDIT) -> Self:
        """The store of a node whose state directory is ``state_dir``."""
        return cls(Path(state_dir) / STORE_FILENAME, readonly=readonly, audit=audit)

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def schema_version(self) -> int:
        """The schema version in the file (``PRAGMA user_version``)."""
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, rolled back on error)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # a failed COMMIT (disk full, I/O error, busy) may leave the transaction open,
                # and every later BEGIN would then fail: end it here, whatever happened
                if self._db.in_transaction:
                    with suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """The connection, held for reads (no transaction is opened)."""
        with self._lock:
            yield self._db

    @property
    def version(self) -> int:
        """The schema version of the open store (older when opened read-only)."""
        return self._version

    def _migrate(self, version: int) -> None:
        """Apply the migrations after ``version``, each in one transaction."""
        for number in range(version, SCHEMA_VERSION):
            with self.transaction() as db:
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {number + 1}")
