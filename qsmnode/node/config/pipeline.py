"""Sections of what the node processes and computes: when a series is complete (tracker),
which acquisitions are QSM candidates (rules) and what each job computes (pipeline: QSM, M1)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qsmnode.node.config.fields import format_number, rule
from qsmnode.qsm import DEFAULT_METHOD, METHOD_NAMES


@dataclass(frozen=True)
class TrackerConfig:
    """``[tracker]``: when a received series counts as complete."""

    quiet_period_s: float = field(default=10.0, metadata=rule(unit="seconds", gt=0))
    max_wait_s: float = field(default=600.0, metadata=rule(unit="seconds", gt=0))

    def _cross_check(self, at: str) -> Iterator[tuple[str, str]]:
        if self.max_wait_s < self.quiet_period_s:
            yield (
                f"{at}max_wait_s",
                f"expected a number (seconds) >= {at}quiet_period_s "
                f"({format_number(self.quiet_period_s)}), got {format_number(self.max_wait_s)}",
            )


@dataclass(frozen=True)
class RulesConfig:
    """``[rules]``: which acquisitions are processed."""

    min_echoes: int = field(default=2, metadata=rule(ge=1))
    require_phase: bool = True
    field_strengths_t: tuple[float, ...] = field(
        default=(), metadata=rule(unit="tesla", gt=0, le=20)
    )
    pass_over: bool = True
    """Series that are plainly not QSM candidates are passed over (named in the status with
    the reason), not problems (:mod:`qsmnode.dicom.grouping`, rule 7)."""
    qsm_series: tuple[str, ...] = field(
        default=(), metadata=rule(expect="a shell pattern (e.g. \"*qsm*\")")
    )
    """Series descriptions of the site's QSM protocol (shell patterns, case-insensitive): such
    a series is never passed over; whatever keeps it from processing is a problem."""


M1_ATLASES: tuple[str, ...] = ("hcpex", "juelich-ba4", "harvard-oxford-precentral")
"""The M1 atlases qsmnode knows (qsmnode.dicom.reference_data.ATLASES; a test keeps them equal)."""


@dataclass(frozen=True)
class PipelineConfig:
    """``[pipeline]``: what each job computes.

    ``m1_normative_table``: a TOML file of normative values for the M1 measurements' z-scores
    (None: no z-scores). It is read and checked with the configuration
    (:func:`qsmnode.node.normative.read_normative_table`), so a bad table stops the node at
    start with the file, the key and the problem named.

    ``qsm_method``: the QSM pipeline (``qsmnode qsm --method``'s names; the default is the one
    measured in ``benchmarks/RESULTS.md``). It is part of the algorithm version the derived
    objects carry, so a follow-up never compares results that two methods made.

    ``z_flag``: a deep-layer χ z-score at or beyond it (either sign) is flagged on the key
    images and is the finding of the Key Object Selection (the ORU has its own ``[hl7]
    z_high``).
    """

    qsm: bool = True
    qsm_method: str = field(default=DEFAULT_METHOD, metadata=rule(choices=METHOD_NAMES))
    m1: bool = True
    atlas: str = field(default="hcpex", metadata=rule(choices=M1_ATLASES))
    m1_normative_table: Path | None = field(default=None,
                                            metadata=rule(expect="a TOML file path"))
    z_flag: float = field(default=2.0, metadata=rule(gt=0))

    def _cross_check(self, at: str) -> Iterator[tuple[str, str]]:
        if self.m1_normative_table is None:
            return
        from qsmnode.node.normative import NormativeTableError, read_normative_table

        try:
            read_normative_table(self.m1_normative_table)
        except NormativeTableError as exc:
            yield f"{at}m1_normative_table", str(exc)
