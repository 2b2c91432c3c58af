"""The SQLite store's transactions."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from qsmnode.node.store import InstanceRecord, Store


def _record(n: int) -> InstanceRecord:
    return InstanceRecord(f"1.2.3.{n}", "1.2.840.10008.5.1.4.1.1.4", "1.2.3", "1.2.3.9",
                          "1.2.840.10008.1.2.1", f"spool/{n}.dcm", 100, "SCANNER7T",
                          "127.0.0.1", 1.0)


def test_a_failed_commit_leaves_the_store_usable(tmp_path: Path) -> None:
    """A COMMIT that fails (here a deferred foreign key, checked only at COMMIT, which SQLite
    leaves the transaction open after; in service a full disk or an I/O error) must not leave
    the connection inside the transaction: every later write would fail until a restart."""
    with Store.in_state_dir(tmp_path) as store:
        with store.transaction() as db:
            db.execute("CREATE TEMP TABLE parent (id INTEGER PRIMARY KEY)")
            db.execute("CREATE TEMP TABLE child (parent_id INTEGER REFERENCES parent (id) "
                       "DEFERRABLE INITIALLY DEFERRED)")
        store._db.execute("PRAGMA foreign_keys = ON")
        with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"), \
                store.transaction() as db:
            db.execute("INSERT INTO child VALUES (42)")
        assert store.add_instance(_record(1), file_is_durable=True)
        assert store.instance("1.2.3.1") is not None
        assert store._db.execute("SELECT count(*) FROM child").fetchone()[0] == 0
