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


def test_a_version_4_store_is_read_before_and_after_its_migration(tmp_path: Path) -> None:
    """A status reader opening a version 4 store read-only sees its series (no passed_over
    column yet, no studies); opened by the node, it gains both and keeps its rows."""
    from qsmnode.node.store import MIGRATIONS, STORE_FILENAME

    db = sqlite3.connect(tmp_path / STORE_FILENAME, isolation_level=None)
    for script in MIGRATIONS[:4]:
        db.executescript(script)
    db.execute("PRAGMA user_version = 4")
    db.execute("INSERT INTO series (series_uid, study_uid, sop_class_uid, received_count, "
               "first_received_at, last_received_at) VALUES ('1.2.1', '1.2', '1.2.3', 1, 1, 1)")
    db.close()
    with Store.in_state_dir(tmp_path, readonly=True) as store:
        [series] = store.series()
        assert series.passed_over is None and store.studies() == {}
    with Store.in_state_dir(tmp_path) as store:
        assert store.schema_version() == len(MIGRATIONS)
        [series] = store.series()
        assert series.series_uid == "1.2.1" and series.passed_over is None


def test_a_version_6_store_gains_the_plan_column_and_keeps_plans_out_of_the_records(
    tmp_path: Path,
) -> None:
    """An acquisition recorded before plans were kept has none (read-only before the
    migration, and after it); one recorded since has its plan, read only on its own (never in
    the records, their ``as_dict`` or the summary)."""
    from qsmnode.node.store import MIGRATIONS, STORE_FILENAME, NewAcquisition

    db = sqlite3.connect(tmp_path / STORE_FILENAME, isolation_level=None)
    for script in MIGRATIONS[:6]:
        db.executescript(script)
    db.execute("PRAGMA user_version = 6")
    db.execute("INSERT INTO acquisitions (study_uid, series_key, series_uids, state, summary, "
               "created_at, updated_at) VALUES ('1.2', '1.2.1', '[\"1.2.1\"]', 'accepted', "
               "'{}', 1, 1)")
    db.close()
    with Store.in_state_dir(tmp_path, readonly=True) as old:
        [acquisition] = old.acquisitions()
        assert old.acquisition_plan(acquisition.id) is None
    with Store.in_state_dir(tmp_path) as store:
        assert store.schema_version() == len(MIGRATIONS) == 7
        assert store.acquisition(acquisition.id) == acquisition
        assert store.acquisition_plan(acquisition.id) is None
        store.add_instance(_record(1), file_is_durable=True)
        store.complete_series("1.2.3.9", 1, "quiet", None, 2.0)
        plan = {"format": 1, "instances": [{"path": "spool/1.dcm"}]}
        outcome = store.record_grouping(
            "1.2.3", 1, [NewAcquisition("1.2.3", ("1.2.3.9",), {"n_echoes": 3}, None, plan)],
            [], 3.0)
        assert outcome is not None
        [new] = outcome.created
        assert store.acquisition_plan(new.id) == plan
        assert "plan" not in new.as_dict() and "plan" not in new.summary
        assert store.acquisition_plan(new.id + 1) is None
