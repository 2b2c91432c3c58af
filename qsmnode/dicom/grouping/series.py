"""Rules 1 and 2: reading instance summaries into series records. Each frame of each instance
(once per SOP Instance UID) goes to the unit of its series and geometry cluster; frames without
an image plane are kept aside per series."""

from __future__ import annotations

import math
from collections import defaultdict

from qsmnode.dicom.grouping.keys import PositionKeys, te_key
from qsmnode.dicom.grouping.records import Cluster, Unit
from qsmnode.dicom.grouping.results import FrameRef
from qsmnode.dicom.headers import FrameInfo, InstanceInfo

UnitKey = tuple[str, bool, int]
"""A unit's identity: series UID, Enhanced or not, cluster."""


def _plane_ok(info: InstanceInfo, frame: FrameInfo) -> bool:
    """The frame has an image plane: position, orientation (two non-zero direction cosine
    vectors), positive pixel spacing and a matrix, all finite."""
    if frame.position is None or frame.orientation is None or frame.pixel_spacing is None:
        return False
    values = (*frame.position, *frame.orientation, *frame.pixel_spacing)
    return (
        bool(info.rows)
        and bool(info.columns)
        and all(math.isfinite(v) for v in values)
        and min(frame.pixel_spacing) > 0
        and any(frame.orientation[:3])
        and any(frame.orientation[3:])
    )


def _cluster_of(
    info: InstanceInfo, frame: FrameInfo, clusters: list[Cluster], cache: dict[tuple, int]
) -> int:
    """Rule 2: the geometry cluster of a frame (by its exact geometry as seen before, else the
    first cluster that accepts it within the tolerances, else a new one)."""
    ckey = (
        info.study_uid,
        info.frame_of_reference_uid,
        info.rows,
        info.columns,
        info.derived,
        frame.orientation,
        frame.pixel_spacing,
    )
    cid = cache.get(ckey)
    if cid is None:
        cid = next((i for i, c in enumerate(clusters) if c.accepts(info, frame)), None)
        if cid is None:
            cid = len(clusters)
            clusters.append(
                Cluster(
                    info.study_uid,
                    info.frame_of_reference_uid,
                    int(info.rows),
                    int(info.columns),
                    frame.orientation,
                    frame.pixel_spacing,
                    info.derived,
                )
            )
        cache[ckey] = cid
    return cid


def collect_units(
    infos: list[InstanceInfo], pos_key: PositionKeys
) -> tuple[list[Cluster], dict[UnitKey, Unit], dict[str, list[InstanceInfo]]]:
    """Rules 1 to 3: each frame of each instance (once per SOP Instance UID) into the unit of
    its series and geometry cluster; the clusters, the units, and per series the instances
    with a frame without image plane geometry."""
    seen_uids: set[str] = set()
    clusters: list[Cluster] = []
    cluster_cache: dict[tuple, int] = {}
    units: dict[UnitKey, Unit] = {}
    no_geometry: dict[str, list[InstanceInfo]] = defaultdict(list)
    for info in infos:
        if info.sop_instance_uid in seen_uids:
            continue
        seen_uids.add(info.sop_instance_uid)
        for frame in info.frames:
            if not _plane_ok(info, frame):
                bad = no_geometry[info.series_uid]
                if not bad or bad[-1] is not info:
                    bad.append(info)
                continue
            cid = _cluster_of(info, frame, clusters, cluster_cache)
            ukey = (info.series_uid, info.enhanced, cid)
            unit = units.get(ukey)
            if unit is None:
                unit = units[ukey] = Unit(cid, info.series_uid, info.series_number)
            unit.refs.append(FrameRef(info, frame))
            unit.t1 = unit.t1 and bool(info.t1_evidence)
            te = te_key(frame)
            unit.keys.add((frame.part, te))
            unit.positions.add(pos_key(frame.position))
    return clusters, units, no_geometry
