"""The Prometheus metrics of the node, read from the store at scrape time.

The node's state is in the store, so the metrics are not counted in memory: every scrape reads
one read-only snapshot of it through :mod:`qsmnode.node.store.queries` (which also serves the
health check and the status page, and says how an older schema is read). Metrics of the
tables an older store lacks are left out, never an error.

:class:`NodeCollector` is a ``prometheus_client`` custom collector; :func:`make_registry` puts
it into a private registry. The metrics:

- ``qsmnode_up`` (gauge): 1 when the store could be read, else 0 (then only the disk
  metrics and the version follow);
- ``qsmnode_build_info{version}`` (info): the qsmnode version;
- ``qsmnode_store_schema_version`` (gauge): ``PRAGMA user_version`` of the store;
- ``qsmnode_instances_received_total`` (counter): instances recorded in the store;
- ``qsmnode_last_instance_received_timestamp_seconds`` (gauge): when the latest one arrived;
- ``qsmnode_series{state}`` (gauge): series by state, ``open`` and ``complete``;
- ``qsmnode_series_completed_total`` (counter): series closed as complete;
- ``qsmnode_acquisitions{state}`` (gauge): ``accepted`` and ``ignored``;
- ``qsmnode_problems_open`` (gauge): unresolved problems;
- ``qsmnode_jobs{state}`` (gauge): ``queued``, ``running``, ``done``, ``failed``;
- ``qsmnode_job_processing_seconds`` (histogram: ``_bucket{le}``, ``_count``, ``_sum``): run
  time of the done jobs, ``finished_at - started_at`` of their successful attempt;
- ``qsmnode_job_last_processing_seconds`` (gauge): that of the job that finished last;
- ``qsmnode_sends{destination,state}`` (gauge): ``pending``, ``sent``, ``failed`` (only with
  a ``sends`` table);
- ``qsmnode_hl7_messages{destination,state}`` (gauge): HL7 ORU^R01 results to each RIS,
  ``pending``, ``sent``, ``failed`` (only with an ``hl7_messages`` table, version 6);
- ``qsmnode_retained_bytes{kind}`` (gauge): bytes of the files kept, ``spool`` and ``outbox``,
  and ``qsmnode_pruned_bytes_total{kind,reason}`` (counter): bytes removed by retention, by
  ``age`` or ``emergency`` (both only with a ``prunings`` table, version 4);
- ``qsmnode_free_disk_bytes`` (gauge): free space on the state directory's file system;
- ``qsmnode_min_free_disk_bytes`` (gauge): the floor, ``listener.min_free_disk_mb``.

The ``_total`` counters are counts of store rows: they only go down if rows are deleted (or a
late instance re-opens a complete series), which Prometheus treats as a counter reset.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from qsmnode import __version__
from qsmnode.node.store.queries import (
    Counts,
    StoreUnavailable,
    read_counts,
    read_store,
)

MIB = 1024 * 1024


def free_disk_bytes(state_dir: Path | str) -> int:
    """Free space, in bytes, on the file system of ``state_dir`` (raises OSError)."""
    return int(shutil.disk_usage(state_dir).free)


# --------------------------------------------------------------------------------------------
# Prometheus


class NodeCollector(Collector):
    """Reads the store of ``state_dir`` at every scrape and reports it as metrics.

    A store that cannot be read gives ``qsmnode_up 0`` (and the disk metrics), not an error.
    """

    def __init__(self, state_dir: Path | str, min_free_disk_bytes: int = 0) -> None:
        self.state_dir = Path(state_dir)
        self.min_free_disk_bytes = int(min_free_disk_bytes)

    def collect(self) -> Iterator[Metric]:
        try:
            with read_store(self.state_dir) as db:
                counts: Counts | None = read_counts(db)
        except StoreUnavailable:
            counts = None
        yield GaugeMetricFamily("qsmnode_up", "1 when the node's store could be read, else 0",
                                value=0 if counts is None else 1)
        yield InfoMetricFamily("qsmnode_build", "The qsmnode version",
                               value={"version": __version__})
        yield from self._disk()
        if counts is not None:
            yield from self._store(counts)

    def _disk(self) -> Iterator[Metric]:
        try:
            free = free_disk_bytes(self.state_dir)
        except OSError:
            free = None
        if free is not None:
            yield GaugeMetricFamily(
                "qsmnode_free_disk_bytes",
                "Free space on the file system of the state directory (spool, outbox, store)",
                value=free)
        yield GaugeMetricFamily(
            "qsmnode_min_free_disk_bytes",
            "Free-space floor (listener.min_free_disk_mb): below it reception answers 0xA700",
            value=self.min_free_disk_bytes)

    def _store(self, counts: Counts) -> Iterator[Metric]:
        yield GaugeMetricFamily("qsmnode_store_schema_version", "Schema version of the store",
                                value=counts.schema_version)
        yield CounterMetricFamily("qsmnode_instances_received",
                                  "DICOM instances received and recorded in the store",
                                  value=counts.instances)
        if counts.last_received_at is not None:
            yield GaugeMetricFamily("qsmnode_last_instance_received_timestamp_seconds",
                                    "Unix time the latest instance was received",
                                    value=counts.last_received_at)
        yield _labelled(GaugeMetricFamily("qsmnode_series", "Series by state",
                                          labels=["state"]), counts.series)
        yield CounterMetricFamily("qsmnode_series_completed",
                                  "Series closed as complete (expected count or quiet period)",
                                  value=counts.series_completed)
        if counts.acquisitions:
            yield _labelled(GaugeMetricFamily("qsmnode_acquisitions", "Acquisitions by state",
                                              labels=["state"]), counts.acquisitions)
        if counts.problems_open is not None:
            yield GaugeMetricFamily("qsmnode_problems_open",
                                    "Images that make no acquisition, unresolved",
                                    value=counts.problems_open)
        if counts.jobs:
            yield _labelled(GaugeMetricFamily("qsmnode_jobs", "Processing jobs by state",
                                              labels=["state"]), counts.jobs)
        processing = counts.processing
        if processing is not None:
            buckets: list[tuple[str, float]] = [(repr(b), n) for b, n in processing.buckets]
            buckets.append(("+Inf", processing.count))
            yield HistogramMetricFamily(
                "qsmnode_job_processing_seconds",
                "Run time of the done jobs (their successful attempt), from the jobs table",
                buckets=buckets, sum_value=processing.sum_s)
            if processing.last_s is not None:
                yield GaugeMetricFamily("qsmnode_job_last_processing_seconds",
                                        "Run time of the job that finished last",
                                        value=processing.last_s)
        if counts.has_sends:
            sends = GaugeMetricFamily("qsmnode_sends",
                                      "Deliveries of derived instances by destination and state",
                                      labels=["destination", "state"])
            for destination, states in counts.sends.items():
                for state, number in states.items():
                    sends.add_metric([destination, state], number)
            yield sends
        if counts.hl7 is not None:
            hl7 = GaugeMetricFamily("qsmnode_hl7_messages",
                                    "HL7 ORU^R01 results to the RIS by destination and state",
                                    labels=["destination", "state"])
            for destination, states in counts.hl7.items():
                for state, number in states.items():
                    hl7.add_metric([destination, state], number)
            yield hl7
        if counts.retained_bytes:
            yield _labelled(GaugeMetricFamily("qsmnode_retained_bytes",
                                              "Bytes of the files kept in the spool and outbox",
                                              labels=["kind"]), counts.retained_bytes)
            pruned = CounterMetricFamily("qsmnode_pruned_bytes",
                                         "Bytes of files removed by retention (age or emergency)",
                                         labels=["kind", "reason"])
            for (kind, reason), number in counts.pruned_bytes.items():
                pruned.add_metric([kind, reason], number)
            yield pruned


def _labelled(family: GaugeMetricFamily, values: dict[str, int]) -> GaugeMetricFamily:
    for label, value in values.items():
        family.add_metric([label], value)
    return family


def make_registry(state_dir: Path | str, min_free_disk_bytes: int = 0) -> CollectorRegistry:
    """A private registry (not prometheus_client's global one) holding a :class:`NodeCollector`
    for ``state_dir``. Nothing is read until it is collected."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(state_dir, min_free_disk_bytes))
    return registry
