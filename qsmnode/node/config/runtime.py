"""Sections of how the node runs on its host: where it keeps its state, the worker pool that
runs the jobs, the removal of old files (retention), the audit log and logging."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qsmnode.node.config.fields import rule


@dataclass(frozen=True)
class PathsConfig:
    """``[paths]``: where the node keeps its state."""

    state_dir: Path = field(
        default=Path("/var/lib/qsmnode"), metadata=rule(expect="a directory path")
    )


@dataclass(frozen=True)
class WorkersConfig:
    """``[workers]``: the process pool that runs QSM jobs."""

    processes: int = field(default=1, metadata=rule(ge=1))
    memory_budget_mb: int = field(default=8192, metadata=rule(unit="MiB", ge=256))
    backend: str = field(default="local", metadata=rule(choices=("local", "dask")))
    """Where job attempts run: "local" child processes, or tasks on a Dask cluster
    (:mod:`qsmnode.node.dask_backend`; ``processes`` then bounds the attempts at once)."""
    scheduler: str | None = field(default=None, metadata=rule(
        expect="a Dask scheduler address tcp://HOST:PORT",
        check=lambda text: bool(re.fullmatch(r"(tcp|tls)://[^\s:/]+:\d{1,5}", text))))
    job_attempts: int = field(default=3, metadata=rule(ge=1))
    lease_s: float = field(default=3600.0, metadata=rule(unit="seconds", gt=0))

    def _cross_check(self, at: str) -> Iterator[tuple[str, str]]:
        if self.backend == "dask" and self.scheduler is None:
            yield (f"{at}scheduler", 'expected a Dask scheduler address tcp://HOST:PORT with '
                   'backend = "dask", got none')


@dataclass(frozen=True)
class RetentionConfig:
    """``[retention]``: removal of the files of finished, delivered studies.

    By age (``enabled``): a study's received images after ``spool_days`` and its derived
    objects after ``outbox_days``, counted from its last event. In an emergency
    (``emergency_margin_mb`` > 0): when free disk falls below ``listener.min_free_disk_mb``
    plus this margin (so always before reception is refused), finished and delivered studies
    go, oldest first, whatever their age, until it is back above. Never anything undelivered or
    not yet processed (:mod:`qsmnode.node.retention`).
    """

    enabled: bool = True
    spool_days: float = field(default=30.0, metadata=rule(unit="days", ge=0))
    outbox_days: float = field(default=30.0, metadata=rule(unit="days", ge=0))
    check_interval_s: float = field(default=3600.0, metadata=rule(unit="seconds", gt=0))
    emergency_margin_mb: int = field(
        default=1024, metadata=rule(expect="an integer >= 0 (MiB; 0 = no emergency clean)",
                                    ge=0))


@dataclass(frozen=True)
class AuditConfig:
    """``[audit]``: the audit log (:mod:`qsmnode.node.audit`)."""

    enabled: bool = True
    log_file: Path | None = field(default=None, metadata=rule(expect="a file path"))

    def path(self, state_dir: Path) -> Path | None:
        """The audit log's file (None when disabled): ``log_file``, else in ``state_dir``."""
        if not self.enabled:
            return None
        from qsmnode.node.audit import AUDIT_FILENAME

        return self.log_file if self.log_file is not None else Path(state_dir) / AUDIT_FILENAME


@dataclass(frozen=True)
class LoggingConfig:
    """``[logging]``."""

    level: str = field(default="INFO", metadata=rule(choices=("DEBUG", "INFO", "WARNING",
                                                              "ERROR")))
