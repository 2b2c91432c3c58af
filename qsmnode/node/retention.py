"""Retention: the files of finished, delivered studies are removed by age, or sooner when the
disk runs low.

What may go is decided by the store (:meth:`~qsmnode.node.store.Store.finished_studies`), per
study: every series complete and grouped, no job queued or running, and every derived
instance still in the outbox ``sent`` to every configured destination. With no destination
configured nothing is delivered, so derived objects stay. A study that receives a late image
is busy again (from the image's arrival, before the tracker re-opens its series) until it is
grouped again.

Received images go only once processed: a study with an unresolved problem (the missing
slice or series may still come, and then its acquisition is processed) or a failed job keeps
them (``StudyRetention.spool_held``, checked again inside the store's pruning transaction),
said once in the log, until an administrator acts; its delivered results may still go.
Ignored acquisitions (a rule leaves them out) and images that are no acquisition's by design
(a T1w reference, non-MR instances) are final.

- **By age** (``[retention] enabled``): every ``check_interval_s``, a finished study's received
  images (the spool, and the work folders of its jobs) go once its last event is
  ``spool_days`` old, and its derived objects (the outbox) once it is ``outbox_days`` old.
- **Emergency clean** (``emergency_margin_mb`` > 0): checked every few seconds. When free disk
  falls below ``listener.min_free_disk_mb + emergency_margin_mb`` (so before the receiver
  refuses images), finished studies go whole (outbox, then spool), oldest first, whatever
  their age, until free disk is back above that threshold. Nothing undelivered or unprocessed
  is ever removed; if that is not enough, a warning says so (once until it changes).

Each removal marks the rows first, in one store transaction that re-checks the study and adds a
``prunings`` record, then deletes the files (a crash in between leaves files whose rows are
marked: at the next start the spool's recovery records them again, and the outbox's deletes
them). Every removal is logged and audited (``pruned``). Rows are kept: the store still says
what was received, processed and sent, and that the files were pruned.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qsmnode.node.config import Settings
from qsmnode.node.jobs import JOBS_DIRNAME
from qsmnode.node.spool import MIB
from qsmnode.node.store import Pruning, Store, StudyRetention

log = logging.getLogger(__name__)

DAY_S = 86400.0
EMERGENCY_POLL_S = 5.0
"""How often free disk is checked for the emergency clean."""


@dataclass
class RetentionPass:
    """What one :meth:`Retention.step` removed."""

    pruned: list[Pruning] = field(default_factory=list)
    emergency: bool = False
    """The emergency clean ran (free disk was below the threshold)."""
    free_bytes: int | None = None
    """Free disk after the pass (when it was checked)."""

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.pruned)


class Retention:
    """Removal of the files of finished studies (see the module docstring).

    ``clock`` gives the time (Unix seconds) and ``free_bytes`` the free space on the state
    directory's file system; tests pass their own.
    """

    def __init__(self, settings: Settings, store: Store, *,
                 clock: Callable[[], float] = time.time,
                 free_bytes: Callable[[], int] | None = None) -> None:
        self.settings = settings
        self.config = settings.retention
        self.store = store
        self.state_dir = Path(settings.paths.state_dir)
        self.clock = clock
        self.free_bytes = free_bytes if free_bytes is not None else self._disk_free
        self.destinations = [d.name for d in settings.destinations]
        self._next_age_pass = 0.0
        self._short_logged = False
        self._held_logged: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def emergency_threshold_bytes(self) -> int | None:
        """Free bytes below which the emergency clean runs (None: it never runs)."""
        if not self.config.emergency_margin_mb:
            return None
        return (self.settings.listener.min_free_disk_mb + self.config.emergency_margin_mb) * MIB

    def _disk_free(self) -> int:
        return int(shutil.disk_usage(self.state_dir).free)

    # -------------------------------------------------------------------------------- the thread

    def start(self) -> None:
        config = self.config
        threshold = self.emergency_threshold_bytes
        log.info("retention: %s; emergency clean %s",
                 f"finished studies' images go after {config.spool_days:g} days, derived "
                 f"objects after {config.outbox_days:g} days (checked every "
                 f"{config.check_interval_s:g} s)" if config.enabled else "no removal by age",
                 "off" if threshold is None else f"below {threshold // MIB} MiB free")
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # keep retention alive: the store may be busy
                log.exception("retention: unexpected error (retrying)")
            self._stop.wait(min(EMERGENCY_POLL_S, self.config.check_interval_s))

    def step(self) -> RetentionPass:
        """The emergency clean when free disk is low, then the age pass when it is due."""
        result = RetentionPass()
        if self.emergency_threshold_bytes is not None:
            self.emergency_clean(result)
        now = self.clock()
        if self.config.enabled and now >= self._next_age_pass:
            self._next_age_pass = now + self.config.check_interval_s
            self.prune_by_age(now, result)
        return result

    # ---------------------------------------------------------------------------------- by age

    def prune_by_age(self, now: float | None = None,
                     result: RetentionPass | None = None) -> RetentionPass:
        """Remove what is old enough: spool after ``spool_days``, outbox after
        ``outbox_days`` (counted from each finished study's last event)."""
        result = result if result is not None else RetentionPass()
        now = self.clock() if now is None else now
        ages = (("outbox", self.config.outbox_days), ("spool", self.config.spool_days))
        for study in self.store.finished_studies(self.destinations):
            for kind, days in ages:
                if not self._may_prune(study, kind):
                    continue
                before = now - days * DAY_S
                if study.settled_at <= before:
                    self._prune(study.study_uid, kind, "age", now, result, settled_before=before)
        return result

    # ------------------------------------------------------------------------------- emergency

    def emergency_clean(self, result: RetentionPass | None = None) -> RetentionPass:
        """When free disk is below the threshold, remove finished studies whole, oldest
        first, until it is back above (see the module docstring)."""
        result = result if result is not None else RetentionPass()
        threshold = self.emergency_threshold_bytes
        if threshold is None:
            return result
        free = self.free_bytes()
        result.free_bytes = free
        if free >= threshold:
            self._short_logged = False
            return result
        result.emergency = True
        freed_before = result.bytes
        for study in self.store.finished_studies(self.destinations):
            for kind in ("outbox", "spool"):
                if self._may_prune(study, kind):
                    self._prune(study.study_uid, kind, "emergency", self.clock(), result,
                                free_before=free)
            free = self.free_bytes()
            result.free_bytes = free
            if free >= threshold:
                log.warning("retention: emergency clean freed %.1f MiB; %d MiB free now (threshold "
                            "%d MiB)", (result.bytes - freed_before) / MIB, free // MIB,
                            threshold // MIB)
                self._short_logged = False
                return result
        if not self._short_logged:
            log.warning("retention: free disk is %d MiB, below the emergency threshold of %d MiB, "
                        "and no finished, delivered study is left to remove (undelivered and "
                        "unprocessed data are kept)", free // MIB, threshold // MIB)
            self._short_logged = True
        return result

    # ------------------------------------------------------------------------------- removing

    def _may_prune(self, study: StudyRetention, kind: str) -> bool:
        """Whether the study keeps files of ``kind`` that may go; says once per study and
        reason why its received images are held."""
        if not _keeps(study, kind):
            return False
        if kind == "spool" and study.spool_held:
            if self._held_logged.get(study.study_uid) != study.spool_held:
                self._held_logged[study.study_uid] = study.spool_held
                log.info("retention: the received images of study %s are kept: %s",
                         study.study_uid, study.spool_held)
            return False
        return True

    def _prune(self, study_uid: str, kind: str, reason: str, now: float,
               result: RetentionPass, *, settled_before: float | None = None,
               free_before: int | None = None) -> None:
        pruning = self.store.prune_study(study_uid, kind, reason, self.destinations, now,
                                         settled_before=settled_before)
        if pruning is None:
            return  # busy again meanwhile, or nothing left
        missing = self._delete(pruning)
        result.pruned.append(pruning)
        log.info("retention: removed %s of study %s (%s): %d instance%s, %.1f MiB%s",
                 "received images" if kind == "spool" else "derived objects", study_uid,
                 "emergency clean" if reason == "emergency" else "age", pruning.instances,
                 "" if pruning.instances == 1 else "s", pruning.bytes / MIB,
                 f"; {missing} files were already gone" if missing else "")
        fields: dict[str, object] = {}
        if free_before is not None:
            fields["free_bytes"] = free_before
        self.store.audit.record("pruned", study_uid=study_uid, kind=kind, reason=reason,
                                instances=pruning.instances, bytes=pruning.bytes,
                                pruning_id=pruning.id, **fields)

    def _delete(self, pruning: Pruning) -> int:
        """Delete a pruning's files (and emptied folders, and its jobs' work folders);
        return how many were already gone."""
        missing = 0
        folders: set[Path] = set()
        for relative in pruning.paths:
            path = self.state_dir / relative
            try:
                path.unlink()
            except FileNotFoundError:
                missing += 1
            except OSError as exc:
                log.error("retention: cannot delete %s: %s", path, exc.strerror or exc)
            folders.add(path.parent)
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            _remove_empty(folder, self.state_dir)
        for job_id in pruning.job_ids:
            shutil.rmtree(self.state_dir / JOBS_DIRNAME / str(job_id), ignore_errors=True)
        return missing


def _keeps(study: StudyRetention, kind: str) -> bool:
    return (study.spool_instances if kind == "spool" else study.outbox_instances) > 0


def _remove_empty(folder: Path, state_dir: Path) -> None:
    """Remove ``folder`` and its parents while empty: up to the spool or outbox root."""
    for current in (folder, folder.parent):
        if len(current.relative_to(state_dir).parts) < 2:
            return  # the spool or outbox root itself stays
        try:
            os.rmdir(current)
        except OSError:
            return  # not empty (or gone)


def retention_status(settings: Settings, store: Store,
                     free_bytes: int | None) -> dict[str, object]:
    """What ``qsmnode status`` shows about retention: the settings, what is kept and pruned
    per kind, the studies finished (removable: a study whose received images are held, with
    nothing delivered to remove, is not counted), free disk and the latest prunings."""
    config = settings.retention
    finished = [study for study in store.finished_studies([d.name for d in settings.destinations])
                if _keeps(study, "outbox") or not study.spool_held]
    margin = config.emergency_margin_mb
    return {
        "enabled": config.enabled,
        "spool_days": config.spool_days,
        "outbox_days": config.outbox_days,
        "check_interval_s": config.check_interval_s,
        "emergency_threshold_mb": (settings.listener.min_free_disk_mb + margin) if margin
        else None,
        "free_disk_mb": None if free_bytes is None else free_bytes // MIB,
        "kept": store.retention_summary(),
        "finished_studies": len(finished),
        "oldest_finished_at": finished[0].settled_at if finished else None,
        "prunings": [
            {k: v for k, v in p.as_dict().items() if k not in ("paths", "job_ids")}
            for p in store.prunings(10)
        ],
    }
