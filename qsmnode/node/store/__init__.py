"""The store: the node's durable state in one SQLite file (WAL mode) under the state directory.

Every state change is one transaction, committed with ``synchronous=FULL`` before the call
returns, so a change the caller was told about survives a crash or power loss. One exception:
a received instance whose spool file is already durable is recorded with ``synchronous=NORMAL``
(see :meth:`Store.add_instance`): the file is the durable record, and the node re-adds spool
files missing from the store when it starts. With an :class:`~qsmnode.node.audit.AuditLog`,
the store writes an event after each commit of a received instance, a series completed, a
grouping (acquisitions, problems), and a job started, done, failed or queued again.

The API is small and has no ORM: records in, records out. Its parts:

- :mod:`~qsmnode.node.store.connection`: the file, the lock, transactions, and the schema
  (:data:`MIGRATIONS`, written once) with its migrations;
- :mod:`~qsmnode.node.store.records`: the record types and the states the tables allow;
- one mixin per aggregate, combined by :class:`Store`: :mod:`~qsmnode.node.store.ingest`
  (instances and series), :mod:`~qsmnode.node.store.grouping` (acquisitions, problems,
  studies), :mod:`~qsmnode.node.store.jobs`, :mod:`~qsmnode.node.store.delivery` (outbox and
  sends), :mod:`~qsmnode.node.store.retention` and :mod:`~qsmnode.node.store.hl7` (the HL7
  results to the RIS, queued by :mod:`qsmnode.node.hl7_queue`);
- :mod:`~qsmnode.node.store.queries`: the read-only queries of the status readers (metrics,
  health check, status page), each on its own read-only snapshot, tolerant of an older schema.
"""

from __future__ import annotations

from qsmnode.node.store.connection import (
    MIGRATIONS,
    SCHEMA_VERSION,
    STORE_FILENAME,
    StoreConnection,
    StoreError,
)
from qsmnode.node.store.delivery import DeliveryMixin
from qsmnode.node.store.grouping import GroupingMixin
from qsmnode.node.store.hl7 import HL7Mixin
from qsmnode.node.store.ingest import IngestMixin
from qsmnode.node.store.jobs import JobsMixin
from qsmnode.node.store.records import (
    ACQUISITION_STATES,
    JOB_STATES,
    PRUNE_KINDS,
    PRUNE_REASONS,
    SEND_STATES,
    SERIES_STATES,
    AcquisitionRecord,
    DestinationSummary,
    DueSend,
    GroupingOutcome,
    InstanceRecord,
    JobRecord,
    NewAcquisition,
    NewProblem,
    OutboxRecord,
    ProblemRecord,
    Pruning,
    SendOutcome,
    SendRecord,
    SeriesRecord,
    StudyInfo,
    StudyReady,
    StudyRetention,
    describe_summary,
    result_notes,
    series_key,
    series_numbers_text,
    study_when,
)
from qsmnode.node.store.retention import RetentionMixin

__all__ = [
    "ACQUISITION_STATES",
    "JOB_STATES",
    "MIGRATIONS",
    "PRUNE_KINDS",
    "PRUNE_REASONS",
    "SCHEMA_VERSION",
    "SEND_STATES",
    "SERIES_STATES",
    "STORE_FILENAME",
    "AcquisitionRecord",
    "DestinationSummary",
    "DueSend",
    "GroupingOutcome",
    "InstanceRecord",
    "JobRecord",
    "NewAcquisition",
    "NewProblem",
    "OutboxRecord",
    "ProblemRecord",
    "Pruning",
    "SendOutcome",
    "SendRecord",
    "SeriesRecord",
    "Store",
    "StoreConnection",
    "StoreError",
    "StudyInfo",
    "StudyReady",
    "StudyRetention",
    "describe_summary",
    "result_notes",
    "series_key",
    "series_numbers_text",
    "study_when",
]


class Store(IngestMixin, GroupingMixin, JobsMixin, DeliveryMixin, RetentionMixin, HL7Mixin):
    """The SQLite store. Thread-safe: one connection, serialised by a lock.

    ``readonly=True`` opens an existing store without writing (no migrations), for status
    readers running beside the node. ``audit``: where the state changes are also written as
    events, after their commit (:mod:`qsmnode.node.audit`; by default nowhere).
    """
