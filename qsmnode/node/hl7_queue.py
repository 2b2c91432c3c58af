"""The durable outbox of HL7 results, as the HL7 sender (:mod:`qsmnode.node.hl7_sender`) and
``qsmnode status``/``resend`` use it. The tables and their SQL are the store's
(:mod:`qsmnode.node.store.hl7`; the schema in :mod:`qsmnode.node.store.connection`).

- :meth:`HL7Queue.register` records when each configured destination was first seen; a done
  job gets a message for a destination only if it finished after that (a RIS added later
  is not flooded with old results).
- :meth:`HL7Queue.unqueued_jobs` lists the done jobs still without a message for a
  destination; :meth:`HL7Queue.add` records a built message (pending) in one transaction,
  and never twice for the same job and destination (``UNIQUE (job_id, destination)``).
- :meth:`HL7Queue.due` gives the pending messages whose time has come;
  :meth:`HL7Queue.record` records the outcome of one try: ``sent`` after an AA (the ER7 text is
  then cleared), ``failed`` after an AR or when the attempts are used up, else pending with the
  next try.

A message is marked sent only in the transaction that follows the RIS's AA, so a node that
dies between the two sends it again at its next start, under the same control ID (MSH-10): the
RIS recognises the repeat. Nothing here logs message text.
"""

from __future__ import annotations

from collections.abc import Sequence

from qsmnode.node.store import Store
from qsmnode.node.store.hl7 import (
    HL7_SCHEMA_VERSION,
    HL7_STATES,
    DueMessage,
    HL7Summary,
    MessageOutcome,
    MessageRecord,
    QueuedMessage,
)

__all__ = [
    "HL7_SCHEMA_VERSION",
    "HL7_STATES",
    "DueMessage",
    "HL7Queue",
    "HL7Summary",
    "MessageOutcome",
    "MessageRecord",
    "QueuedMessage",
]


class HL7Queue:
    """The HL7 messages of ``store`` (empty answers before schema version 6)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @property
    def available(self) -> bool:
        return self.store.hl7_available

    def register(self, names: Sequence[str], now: float) -> dict[str, float]:
        """Record the destinations not seen before (since ``now``); return name -> since."""
        return self.store.register_hl7_destinations(names, now)

    def unqueued_jobs(self, destination: str, since: float, limit: int = 20) -> list[int]:
        """Done jobs finished at or after ``since`` without a message to ``destination``,
        oldest first."""
        return self.store.hl7_unqueued_jobs(destination, since, limit)

    def add(self, message: QueuedMessage, now: float) -> bool:
        """Record a message, pending and due now; False (nothing changes) when its job already
        has one for the destination, or its control ID is already queued there."""
        return self.store.add_hl7_message(message, now)

    def add_unbuildable(self, control_id: str, destination: str, job_id: int, study_uid: str,
                        error: str, now: float) -> bool:
        """Record a job whose message cannot be built as failed, with why (shown in the
        status; not tried again)."""
        return self.store.add_unbuildable_hl7_message(control_id, destination, job_id,
                                                      study_uid, error, now)

    def due(self, destination: str, now: float, limit: int = 50) -> list[DueMessage]:
        """Pending messages to ``destination`` due at ``now``, in the order recorded."""
        return self.store.due_hl7_messages(destination, now, limit)

    def next_try_at(self, destinations: Sequence[str]) -> float | None:
        """The earliest next try of a pending message to one of ``destinations``."""
        return self.store.hl7_next_try_at(destinations)

    def record(self, outcome: MessageOutcome, now: float) -> bool:
        """Record one try (one more attempt) of a pending message; False when it is not
        pending any more."""
        return self.store.record_hl7_try(outcome, now)

    def requeue_failed(self, now: float, study_uid: str | None = None) -> int:
        """Queue failed messages again (``qsmnode resend``), of one study or all; see
        :meth:`~qsmnode.node.store.hl7.HL7Mixin.requeue_failed_hl7`. Returns how many."""
        return self.store.requeue_failed_hl7(now, study_uid)

    def messages(self, state: str | None = None, destination: str | None = None,
                 limit: int = 1000) -> list[MessageRecord]:
        """Messages (without their text), newest first."""
        return self.store.hl7_messages(state, destination, limit)

    def summary(self) -> list[HL7Summary]:
        """Per destination with messages (see :class:`HL7Summary`)."""
        return self.store.hl7_summary()
