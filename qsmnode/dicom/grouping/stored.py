"""Plans as JSON: what the tracker records with an acquisition, so that its job loads the
acquisition the tracker grouped without summarizing and grouping the files again.

:func:`plan_to_json` writes a plan with its T1w reference; :func:`plan_from_json` reads it back,
equal to the plan written (every field, every frame, the affine to the last bit). Each
instance the plan uses is written once, with all its frames (``instances``); a frame of the
plan is ``[instance index, frame index]``. Paths are written relative to ``root`` (the node's
state directory, as the store records spool paths) and read back under it.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from qsmnode.dicom.grouping.results import AcquisitionPlan, FrameRef, T1wReference
from qsmnode.dicom.headers import FrameInfo, InstanceInfo, Part, Vendor

PLAN_FORMAT = 1
"""The version of the layout written by :func:`plan_to_json`."""

_TUPLE_FRAME_FIELDS = ("position", "orientation", "pixel_spacing")


class _Instances:
    """The instances of a plan being written, each once, with the index of each frame."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.rows: list[dict[str, Any]] = []
        self._index: dict[int, int] = {}

    def ref(self, ref: FrameRef) -> list[int]:
        key = id(ref.instance)
        if key not in self._index:
            self._index[key] = len(self.rows)
            self.rows.append(self._instance(ref.instance))
        frames = ref.instance.frames
        number = next((i for i, f in enumerate(frames) if f is ref.frame), None)
        return [self._index[key], frames.index(ref.frame) if number is None else number]

    def _instance(self, info: InstanceInfo) -> dict[str, Any]:
        data = {f.name: getattr(info, f.name) for f in fields(InstanceInfo)}
        data["vendor"] = str(info.vendor)
        data["image_type"] = list(info.image_type)
        data["frames"] = [_frame_json(frame) for frame in info.frames]
        path = info.path
        if path is not None and self.root is not None:
            try:
                path = Path(path).relative_to(self.root).as_posix()
            except ValueError:
                pass  # outside the root: kept absolute
        data["path"] = path
        return data


def _frame_json(frame: FrameInfo) -> dict[str, Any]:
    data = {f.name: getattr(frame, f.name) for f in fields(FrameInfo)}
    data["part"] = str(frame.part)
    for name in _TUPLE_FRAME_FIELDS:
        if data[name] is not None:
            data[name] = list(data[name])
    return data


def _frame_from(data: dict[str, Any]) -> FrameInfo:
    values = dict(data)
    values["part"] = Part(values["part"])
    for name in _TUPLE_FRAME_FIELDS:
        if values[name] is not None:
            values[name] = tuple(values[name])
    return FrameInfo(**values)


def _instance_from(data: dict[str, Any], root: Path | None) -> InstanceInfo:
    values = dict(data)
    values["vendor"] = Vendor(values["vendor"])
    values["image_type"] = tuple(values["image_type"])
    values["frames"] = tuple(_frame_from(f) for f in values["frames"])
    if values["path"] is not None and root is not None:
        values["path"] = str(Path(root) / values["path"])
    return InstanceInfo(**values)


def _table_json(table: tuple[tuple[FrameRef, ...], ...] | None, instances: _Instances,
                ) -> list[list[list[int]]] | None:
    if table is None:
        return None
    return [[instances.ref(ref) for ref in row] for row in table]


def plan_to_json(plan: AcquisitionPlan, root: str | Path | None = None) -> dict[str, Any]:
    """A plan and its T1w reference as JSON-ready data; paths under ``root`` relative to it
    (None: as they are)."""
    instances = _Instances(None if root is None else Path(root))
    data: dict[str, Any] = {
        "format": PLAN_FORMAT,
        "study_uid": plan.study_uid,
        "frame_of_reference_uid": plan.frame_of_reference_uid,
        "series_uids": list(plan.series_uids),
        "series_numbers": list(plan.series_numbers),
        "series_description": plan.series_description,
        "vendor": str(plan.vendor),
        "echo_times_s": [float(te) for te in plan.echo_times_s],
        "rows": plan.rows,
        "columns": plan.columns,
        "affine": np.asarray(plan.affine, dtype=np.float64).tolist(),
        "magnitude": _table_json(plan.magnitude, instances),
        "phase": _table_json(plan.phase, instances),
        "field_strength_t": plan.field_strength_t,
        "t1w": None,
        "t1w_note": plan.t1w_note,
        "left_out": plan.left_out,
    }
    if plan.t1w is not None:
        t1w = plan.t1w
        data["t1w"] = {
            "study_uid": t1w.study_uid,
            "frame_of_reference_uid": t1w.frame_of_reference_uid,
            "series_uid": t1w.series_uid,
            "series_number": t1w.series_number,
            "series_description": t1w.series_description,
            "evidence": t1w.evidence,
            "rows": t1w.rows,
            "columns": t1w.columns,
            "affine": np.asarray(t1w.affine, dtype=np.float64).tolist(),
            "frames": [instances.ref(ref) for ref in t1w.frames],
        }
    data["instances"] = instances.rows
    return data


def plan_from_json(data: dict[str, Any], root: str | Path | None = None) -> AcquisitionPlan:
    """The plan :func:`plan_to_json` wrote; relative paths are read under ``root``.

    Raises:
        ValueError: ``data`` is not a plan of a layout this version reads.
    """
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
        raise ValueError(f"not a stored plan of format {PLAN_FORMAT}")
    base = None if root is None else Path(root)
    infos = [_instance_from(row, base) for row in data["instances"]]

    def ref(pair: list[int]) -> FrameRef:
        info = infos[pair[0]]
        return FrameRef(info, info.frames[pair[1]])

    def table(rows: list[list[list[int]]] | None) -> tuple[tuple[FrameRef, ...], ...] | None:
        return None if rows is None else tuple(tuple(ref(p) for p in row) for row in rows)

    t1w = None
    if data["t1w"] is not None:
        t = data["t1w"]
        t1w = T1wReference(
            study_uid=t["study_uid"], frame_of_reference_uid=t["frame_of_reference_uid"],
            series_uid=t["series_uid"], series_number=t["series_number"],
            series_description=t["series_description"], evidence=t["evidence"],
            rows=t["rows"], columns=t["columns"],
            affine=np.asarray(t["affine"], dtype=np.float64),
            frames=tuple(ref(p) for p in t["frames"]))
    magnitude = table(data["magnitude"])
    assert magnitude is not None
    return AcquisitionPlan(
        study_uid=data["study_uid"],
        frame_of_reference_uid=data["frame_of_reference_uid"],
        series_uids=tuple(data["series_uids"]),
        series_numbers=tuple(data["series_numbers"]),
        series_description=data["series_description"],
        vendor=Vendor(data["vendor"]),
        echo_times_s=tuple(data["echo_times_s"]),
        rows=data["rows"],
        columns=data["columns"],
        affine=np.asarray(data["affine"], dtype=np.float64),
        magnitude=magnitude,
        phase=table(data["phase"]),
        field_strength_t=data["field_strength_t"],
        t1w=t1w,
        t1w_note=data["t1w_note"],
        left_out=data["left_out"],
    )
