"""The group level: one table of every acquisition's measures and QC, and figures.

``OUTPUT_DIR/qsmnode/group/cohort.tsv`` has one row per acquisition, area and layer when the
M1 analysis ran, else one row per acquisition; a failed acquisition has a row with its status
and error, never none. Beside it ``cohort.json`` describes the columns, and when there are M1
measurements two figures: deep-layer χ per area (with the normative band when a normative
table was given) and cortical thickness per area, as PNG.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qsmnode.bids.derivatives import (
    GROUP,
    LOGS,
    MEASUREMENT_UNITS,
    derivatives_root,
    write_json,
    write_tsv,
)

BASE_COLUMNS = ("subject", "session", "acquisition", "status", "error", "mask_fraction",
                "fit_residual_rad_median", "m1_error", "qc_failed")
"""Per-acquisition columns; the entities (``acq``, ``run``, …) follow ``session``."""


class CohortError(ValueError):
    """The group level cannot run (no participant-level output); the message says where."""


@dataclass
class CohortTable:
    """The group table, its file and figures, and the acquisitions that failed."""

    path: Path
    header: list[str]
    rows: list[dict[str, Any]]
    figures: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def read_records(root: Path) -> list[dict[str, Any]]:
    """Every acquisition record under the derivatives root, sorted by name.

    Raises:
        CohortError: there is none (the participant level has not run there).
    """
    records = []
    for path in sorted((root / LOGS).glob("*.json")) if (root / LOGS).is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CohortError(f"{path}: unreadable acquisition record ({exc})") from None
        if isinstance(record, dict) and "acquisition" in record:
            records.append(record)
    if not records:
        raise CohortError(f"{root}: no participant-level results (run the participant level "
                          "with the same OUTPUT_DIR first)")
    return records


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _measurements(root: Path, record: Mapping[str, Any]) -> list[dict[str, str]]:
    name = f"{record['acquisition']}_desc-m1_measurements.tsv"
    for rel in record.get("outputs", []):
        if rel.endswith(name):
            return _read_tsv(root / rel)
    return []


def select(records: list[dict[str, Any]], subjects: list[str] | None,
           sessions: list[str] | None) -> list[dict[str, Any]]:
    """The records of the participants and sessions given (None: all).

    Raises:
        CohortError: none is left.
    """
    chosen = [r for r in records
              if (subjects is None or r.get("subject") in subjects)
              and (sessions is None or r.get("session") in sessions)]
    if not chosen:
        raise CohortError("no participant-level results for the participants and sessions "
                          "selected")
    return chosen


def build_table(output_dir: Path, subjects: list[str] | None = None,
                sessions: list[str] | None = None) -> CohortTable:
    """Collect every record and M1 measurement under ``OUTPUT_DIR/qsmnode`` (of the
    participants and sessions given, labels without prefix; None: all) into the cohort table
    and write it (``group/cohort.tsv`` and ``.json``).

    Raises:
        CohortError: no participant-level output there (for the selection).
    """
    root = derivatives_root(output_dir)
    records = select(read_records(root), subjects, sessions)
    entity_keys = list(dict.fromkeys(k for r in records for k in (r.get("entities") or {})))
    measure_keys: list[str] = []
    rows: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    for record in records:
        quality = record.get("quality") or {}
        m1 = record.get("m1") or {}
        failed_flags = [f["name"] for f in m1.get("flags", []) if not f.get("passed")]
        base = {
            "subject": record.get("subject"), "session": record.get("session"),
            **{k: (record.get("entities") or {}).get(k) for k in entity_keys},
            "acquisition": record["acquisition"], "status": record.get("status"),
            "error": record.get("error"), "mask_fraction": quality.get("mask_fraction"),
            "fit_residual_rad_median": quality.get("fit_residual_rad_median"),
            "m1_error": m1.get("error"), "qc_failed": ",".join(failed_flags) or None,
        }
        if record.get("status") != "done":
            failed[record["acquisition"]] = str(record.get("error"))
        measured = _measurements(root, record) if record.get("status") == "done" else []
        if not measured:
            rows.append(base)
        for m in measured:
            measure_keys += [k for k in m if k not in measure_keys]
            rows.append({**base, **{k: (None if v == "n/a" else v) for k, v in m.items()}})
    header = ["subject", "session", *entity_keys,
              *[c for c in BASE_COLUMNS if c not in ("subject", "session")], *measure_keys]
    path = write_tsv(root / GROUP / "cohort.tsv", header,
                     [[row.get(c) for c in header] for row in rows])
    describe = {c: {"Description": c.replace("_", " ")} for c in header}
    for c, unit in MEASUREMENT_UNITS.items():
        if c in describe:
            describe[c]["Units"] = unit
    describe["status"]["Levels"] = {"done": "processed", "failed": "not processed: see error"}
    describe["qc_failed"]["Description"] = "the M1 quality checks that failed, by name"
    write_json(path.with_suffix(".json"), describe)
    return CohortTable(path, header, rows, failed=failed)


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out == out else None


def _norm_band(normative: Any, area: str, layer: str) -> tuple[float, float] | None:
    if normative is None:
        return None
    value = normative.get(area, layer)
    if value is None:
        return None
    return (value.chi_mean_ppm - 2 * value.chi_sd_ppm, value.chi_mean_ppm + 2 * value.chi_sd_ppm)


def plot_figures(table: CohortTable, normative: Any = None) -> list[Path]:
    """Deep-layer χ per area (norm band: normative mean ± 2 SD, when given) and cortical
    thickness per area, one point per acquisition (hollow: measures not reliable), as PNG
    beside the table. No figure without M1 measurements; none without matplotlib (a note
    says so)."""
    from qsmnode.m1.result import AREAS

    measured = [r for r in table.rows if r.get("area") in AREAS]
    if not measured:
        table.notes.append("no M1 measurements: run the participant level with --m1 for the "
                           "figures")
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        table.notes.append("matplotlib is not installed: no figures")
        return []
    figures = []
    for layer, column, unit, title, name in (
        ("deep", "chi_mean_ppm", "ppm", "Deep-layer χ per M1 area", "deep_chi_per_area.png"),
        ("all", "thickness_mean_mm", "mm", "Cortical thickness per M1 area",
         "thickness_per_area.png"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for x, area in enumerate(AREAS):
            band = _norm_band(normative, area, layer) if column == "chi_mean_ppm" else None
            if band is not None:
                what = ("placeholder normative table, not clinical" if getattr(
                    normative, "placeholder", False) else "normative mean ± 2 SD")
                ax.fill_between([x - 0.4, x + 0.4], *band, color="0.85", zorder=0,
                                label=what if x == 0 else None)
            points = [(r, _number(r.get(column))) for r in measured
                      if r["area"] == area and r.get("layer") == layer]
            points = [(r, v) for r, v in points if v is not None]
            for k, (row, value) in enumerate(points):
                reliable = str(row.get("qc_measures_reliable")).lower() == "true"
                offset = (k - (len(points) - 1) / 2) * 0.08
                ax.plot(x + offset, value, "o", color="C0",
                        markerfacecolor="C0" if reliable else "none")
        ax.set_xticks(range(len(AREAS)), [a.replace("_", " ") for a in AREAS])
        ax.set_ylabel(f"{column.replace('_', ' ')} ({unit})")
        ax.set_title(f"{title} ({len({r['acquisition'] for r in measured})} acquisitions; "
                     "hollow: not reliable)", fontsize=10)
        if normative is not None and column == "chi_mean_ppm":
            ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        path = table.path.parent / name
        fig.savefig(path)
        plt.close(fig)
        figures.append(path)
    table.figures = figures
    return figures


def normative_of(records: list[dict[str, Any]], given: Path | None) -> Path | None:
    """The normative table for the figures: the one given, else the one the participant
    level used (when all acquisitions used the same)."""
    if given is not None:
        return given
    used = {(r.get("m1") or {}).get("normative_table") for r in records} - {None}
    return Path(used.pop()) if len(used) == 1 else None


def run_group(output_dir: Path, normative: Path | None = None,
              subjects: list[str] | None = None,
              sessions: list[str] | None = None) -> CohortTable:
    """The group level: the table and the figures (of the participants and sessions given).

    Raises:
        CohortError: no participant-level output.
        qsmnode.node.normative.NormativeTableError: the normative table cannot be used.
    """
    table = build_table(output_dir, subjects, sessions)
    path = normative_of(select(read_records(derivatives_root(output_dir)), subjects, sessions),
                        normative)
    table_values = None
    if path is not None:
        from qsmnode.node.normative import read_normative_table

        table_values = read_normative_table(path)
    plot_figures(table, table_values)
    return table
