"""``qsmnode status [--json]``: what the node's store records, read while the node runs.

The studies (accession, date, description, who sent them), the series (state, counts, what
became of each), the acquisitions found in them, their jobs (state, attempts, last error or
result notes), the open problems, and the delivery: the outbox, each destination's sends, the
HL7 results (:mod:`qsmnode.node.hl7_status`) and retention (what is kept, what was pruned).
Cells are printed with control characters escaped (:func:`printable`): a series description
comes from a peer.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qsmnode.node.config import Settings
    from qsmnode.node.store import Store


def printable(text: str) -> str:
    """``text`` with control characters (an escape sequence or a newline in a series
    description from a peer) shown as ``\\x..`` escapes, so they cannot act on the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Print ``rows`` under ``header`` in aligned columns (cells made printable)."""
    rows = [tuple(printable(cell) for cell in row) for row in rows]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())


def run_status(config: Path | None, as_json: bool = False) -> int:
    """``qsmnode status``: what the store of the node configured in ``config`` records (see
    the module docstring), as tables or, with ``as_json``, as JSON. Returns the exit status:
    0, or 2 when the configuration or the store cannot be read."""
    from qsmnode.node.config import ConfigError, load_settings
    from qsmnode.node.hl7_status import hl7_status, print_hl7_status
    from qsmnode.node.store import Store, StoreError, StudyInfo, describe_summary, study_when
    from qsmnode.node.store.records import result_notes

    try:
        settings = load_settings(config)
        with Store.in_state_dir(settings.paths.state_dir, readonly=True) as store:
            summary = store.summary()
            series = store.series()
            path, version = store.path, store.schema_version()
            counts = store.counts()
            new = version >= 2
            acquisitions = store.acquisitions() if new else []
            jobs = store.jobs() if new else []
            problems = store.problems(include_resolved=True) if new else []
            studies = store.studies()
            senders = store.study_senders()
            delivery = _delivery(store, settings)
            retention = _retention(store, settings)
            hl7 = hl7_status(store, settings)
    except (ConfigError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if as_json:
        report = {
            "store": str(path), "schema_version": version, "summary": summary,
            "counts": counts,
            "studies": [
                {**(studies[uid].as_dict() if uid in studies else {"study_uid": uid}),
                 "senders": list(senders.get(uid, ()))}
                for uid in dict.fromkeys(s.study_uid for s in series)],
            "series": [s.as_dict() for s in series],
            "acquisitions": [a.as_dict() for a in acquisitions],
            "jobs": [{**j.as_dict(), "notes": list(result_notes(j.result))} for j in jobs],
            "problems": [p.as_dict() for p in problems],
            "delivery": delivery,
            "retention": retention,
            "hl7": hl7,
        }
        print(json.dumps(report, indent=2))
        return 0

    def when(t: float | None) -> str:
        return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))

    def tally(states: dict[str, int]) -> str:
        return ", ".join(f"{n} {state}" for state, n in states.items() if n) or "none"

    print(f"store: {path} (schema {version})")
    print(f"series: {summary['series']} ({summary['series_open']} open, "
          f"{summary['series_complete']} complete); instances: {summary['instances']} "
          f"({summary['bytes'] / 2**20:.1f} MiB)")
    open_problems = [p for p in problems if p.resolved_at is None]
    if new:
        print(f"acquisitions: {tally(counts['acquisitions'])}; jobs: {tally(counts['jobs'])}; "
              f"problems: {len(open_problems)} open, "
              f"{len(problems) - len(open_problems)} resolved")
    if series:
        print()
        table(
            ("ACCESSION", "STUDY DATE", "STUDY DESCRIPTION", "SENT BY", "SERIES", "STUDY UID"),
            [
                (
                    info.accession_number or "-",
                    study_when(info.study_date, info.study_time) or "-",
                    info.study_description or "-", ", ".join(senders.get(uid, ())) or "-",
                    str(sum(s.study_uid == uid for s in series)), uid,
                )
                for uid in dict.fromkeys(s.study_uid for s in series)
                for info in [studies.get(uid) or StudyInfo(uid)]
            ],
        )
        print()
        table(
            ("SERIES", "STATE", "INSTANCES", "EXPECTED", "MOD", "LAST RECEIVED", "DESCRIPTION",
             "OUTCOME", "SERIES UID"),
            [
                (
                    "-" if s.series_number is None else str(s.series_number), s.state,
                    str(s.received_count),
                    "-" if s.expected_count is None else str(s.expected_count),
                    s.modality or "-", when(s.last_received_at), s.series_description or "-",
                    _series_outcome(s, acquisitions, open_problems), s.series_uid,
                )
                for s in series
            ],
        )
    job_of = {j.acquisition_id: j for j in jobs}
    if acquisitions:
        print()
        table(
            ("ACQ", "STATE", "JOB", "RECEIVED", "ACQUISITION", "STUDY UID"),
            [
                (
                    str(a.id), a.state if a.reason is None else f"{a.state}: {a.reason}",
                    str(job_of[a.id].id) if a.id in job_of else "-", when(a.created_at),
                    describe_summary(a.summary), a.study_uid,
                )
                for a in acquisitions
            ],
        )
    if jobs:
        print()
        table(
            ("JOB", "ACQ", "STATE", "ATTEMPTS", "UPDATED", "LAST ERROR / RESULT NOTES"),
            [
                (str(j.id), str(j.acquisition_id), j.state, str(j.attempts), when(j.updated_at),
                 j.last_error or "; ".join(result_notes(j.result if j.state == "done" else None))
                 or "-")
                for j in jobs
            ],
        )
    if open_problems:
        print()
        table(
            ("PROBLEM", "FOUND", "STUDY UID", "REASON"),
            [(str(p.id), when(p.created_at), p.study_uid, p.reason) for p in open_problems],
        )
    outbox = delivery["outbox"]
    if outbox["instances"] or delivery["destinations"]:
        print()
        print(f"outbox: {outbox['instances']} derived instances "
              f"({outbox['bytes'] / 2**20:.1f} MiB)")
    if delivery["destinations"]:
        print()
        table(
            ("DESTINATION", "PEER", "PENDING", "SENT", "FAILED", "ATTEMPTS", "RETRIES",
             "NEXT TRY", "LAST SENT", "LAST ERROR"),
            [
                (d["destination"], d["peer"] or "(not configured)", str(d["pending"]),
                 str(d["sent"]), str(d["failed"]), str(d["attempts"]), str(d["retries"]),
                 when(d["next_try_at"]), when(d["last_sent_at"]), d["last_error"] or "-")
                for d in delivery["destinations"]
            ],
        )
    print_hl7_status(hl7, when, table)
    print()
    _print_retention(retention, when)
    return 0


def _series_outcome(series: Any, acquisitions: list[Any], problems: list[Any]) -> str:
    """What became of a series, in one line: its acquisition, the acquisition it is the T1w
    reference of, its open problem, or why it was passed over ("-": not grouped yet)."""
    for a in acquisitions:
        if series.series_uid in a.series_uids:
            return f"acquisition {a.id}" + ("" if a.state == "accepted" else f" ({a.state})")
    for a in acquisitions:
        t1w = a.summary.get("t1w") or {}
        if isinstance(t1w, dict) and t1w.get("series_uid") == series.series_uid:
            return f"T1w reference of acquisition {a.id}"
    for p in problems:
        if series.series_uid in p.series_uids:
            return f"problem {p.id}"
    if series.passed_over:
        return f"passed over: {series.passed_over}"
    return "-"


def _retention(store: Store, settings: Settings) -> dict[str, Any]:
    """The retention part of ``qsmnode status`` (:func:`qsmnode.node.retention
    .retention_status`), with the free disk of the state directory."""
    from qsmnode.node.retention import retention_status

    try:
        free: int | None = shutil.disk_usage(settings.paths.state_dir).free
    except OSError:
        free = None
    return retention_status(settings, store, free)


def _print_retention(retention: dict[str, Any], when: Any) -> None:
    kept = retention["kept"]

    def part(kind: str) -> str:
        k = kept[kind]
        return (f"{kind} keeps {k['instances']} instances ({k['bytes'] / 2**20:.1f} MiB), "
                f"{k['pruned_instances']} pruned ({k['pruned_bytes'] / 2**20:.1f} MiB)")

    age = (f"by age after {retention['spool_days']:g} days (spool), "
           f"{retention['outbox_days']:g} days (outbox)" if retention["enabled"]
           else "no removal by age")
    threshold = retention["emergency_threshold_mb"]
    emergency = "off" if threshold is None else f"below {threshold} MiB free"
    free = retention["free_disk_mb"]
    print(f"retention: {age}; emergency clean {emergency}; "
          f"{'?' if free is None else free} MiB free now")
    print(f"retention: {part('spool')}; {part('outbox')}")
    oldest = retention["oldest_finished_at"]
    print(f"retention: {retention['finished_studies']} finished, delivered studies may be "
          f"removed{'' if oldest is None else f' (oldest settled {when(oldest)})'}")
    if retention["prunings"]:
        print()
        table(
            ("PRUNED", "REASON", "KIND", "INSTANCES", "MIB", "STUDY UID"),
            [(when(p["at"]), p["reason"], p["kind"], str(p["instances"]),
              f"{p['bytes'] / 2**20:.1f}", p["study_uid"]) for p in retention["prunings"]],
        )


UNDELIVERED_SHOWN = 500


def _delivery(store: Store, settings: Settings) -> dict[str, Any]:
    """The delivery part of ``qsmnode status``: the outbox, and per destination (configured
    or with sends) the sends by state, attempts, retries, next try and last error; the sends
    not delivered yet (the first :data:`UNDELIVERED_SHOWN`)."""
    from qsmnode.node.store import DestinationSummary

    summaries = {d.destination: d for d in store.delivery()}
    configured = {d.name: f"STOW-RS {d.stow_url}" if d.stow_url else
                  f"{d.ae_title}@{d.host}:{d.port}{' TLS' if d.tls.enabled else ''}"
                  for d in settings.destinations}
    destinations = []
    for name in [*configured, *(n for n in summaries if n not in configured)]:
        summary = summaries.get(name, DestinationSummary(name))
        destinations.append({**summary.as_dict(), "peer": configured.get(name)})
    outbox = store.outbox_summary()
    undelivered = [s for s in store.sends() if s.state != "sent"]
    return {"outbox": outbox, "destinations": destinations,
            "undelivered_count": len(undelivered),
            "undelivered": [s.as_dict() for s in undelivered[:UNDELIVERED_SHOWN]]}
