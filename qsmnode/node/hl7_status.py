"""The HL7 part of ``qsmnode status``: per RIS (configured, or with messages in the store) the
ORU^R01 messages by state, and the messages not acknowledged yet or with notes, with why.

A destination that has messages but is no longer configured is shown as such ("not
configured"): its pending messages wait, and are sent if it comes back under the same name.
Nothing here shows patient data (the store's message rows hold none but the ER7 text, which is
never read here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qsmnode.node.config import Settings
from qsmnode.node.hl7_queue import HL7Queue, HL7Summary
from qsmnode.node.store import Store

SHOWN = 200
"""Messages listed at most (newest first)."""


def hl7_status(store: Store, settings: Settings) -> dict[str, Any]:
    """``{"destinations": [...], "messages": [...]}`` for ``qsmnode status --json``."""
    from qsmnode.node.hl7_sender import peer_text

    queue = HL7Queue(store)
    summaries = {s.destination: s for s in queue.summary()}
    configured = {d.name: peer_text(d) for d in settings.hl7.destinations}
    destinations = []
    for name in [*configured, *(n for n in summaries if n not in configured)]:
        summary = summaries.get(name, HL7Summary(name))
        destinations.append({**summary.as_dict(), "peer": configured.get(name)})
    messages = [m.as_dict() for m in queue.messages(limit=SHOWN)]
    return {"destinations": destinations, "messages": messages}


def print_hl7_status(report: dict[str, Any], when: Callable[[float | None], str],
                     table: Callable[[tuple[str, ...], list[tuple[str, ...]]], None]) -> None:
    """The text form: one row per RIS, then the messages that are not plainly acknowledged
    (pending, failed, or with notes such as a missing accession number)."""
    if not report["destinations"]:
        return
    print()
    table(
        ("RIS", "PEER", "PENDING", "ACKNOWLEDGED", "FAILED", "ATTEMPTS", "NEXT TRY",
         "LAST ACK", "LAST ERROR"),
        [(d["destination"], d["peer"] or "(not configured)", str(d["pending"]), str(d["sent"]),
          str(d["failed"]), str(d["attempts"]), when(d["next_try_at"]),
          when(d["last_sent_at"]), d["last_error"] or "-")
         for d in report["destinations"]],
    )
    notable = [m for m in report["messages"] if m["state"] != "sent" or m["notes"]
               or m["abnormal"]]
    if notable:
        print()
        table(
            ("ORU CONTROL ID", "RIS", "JOB", "STATE", "ACK", "FLAG", "STUDY UID", "NOTES / ERROR"),
            [(m["control_id"], m["destination"], str(m["job_id"]), m["state"],
              m["last_ack_code"] or "-", m["abnormal"] or "-", m["study_uid"],
              "; ".join([*m["notes"], *([m["last_error"]] if m["last_error"] else [])]) or "-")
             for m in notable],
        )
