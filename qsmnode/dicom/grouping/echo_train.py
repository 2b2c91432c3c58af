"""Rule 3: series records into candidate acquisitions, in series-number order, each joining the
first candidate whose slices overlap its own, which lacks its (part, echo) keys, and whose echo
train is its own (not another scan of the same geometry)."""

from __future__ import annotations

from collections.abc import Iterable

from qsmnode.dicom.grouping.keys import EchoKey
from qsmnode.dicom.grouping.records import Candidate, Unit
from qsmnode.dicom.headers import Part


def _echo_times(keys: set[tuple[Part, EchoKey | None]]) -> set[EchoKey]:
    """The echo times among (part, echo) keys."""
    return {te for _, te in keys if te is not None}


def _same_echo_train(cand: Candidate, unit: Unit) -> bool:
    """Whether ``unit`` may belong to the echo train of ``cand``: it shares an echo time with it
    (e.g. the phase series of a magnitude series), or both are series of one echo time each
    (one series per echo) and nothing in their headers says they are two scans
    (:func:`_other_scan`). A series whose echo times are all new to the candidate is another
    scan (e.g. the same geometry with other echo times), not more echoes of this one."""
    unit_tes, cand_tes = _echo_times(unit.keys), _echo_times(cand.keys)
    if not unit_tes or not cand_tes or unit_tes & cand_tes:
        return True
    return (
        len(unit_tes) == 1
        and all(len(_echo_times(u.keys)) <= 1 for u in cand.units)
        and not any(_other_scan(u, unit) for u in cand.units)
    )


def _other_scan(a: Unit, b: Unit) -> str:
    """Why two series of one echo time each are two scans, not two echoes of one acquisition
    ("" when their headers do not tell): each is echo number 1 (or both the same number),
    their series descriptions differ, or their ImagesInAcquisition differ."""
    ia, ib = a.refs[0].instance, b.refs[0].instance
    na = {r.frame.echo_number for r in a.refs} - {None}
    nb = {r.frame.echo_number for r in b.refs} - {None}
    if na and na == nb:
        return f"both are echo number {', '.join(map(str, sorted(na)))}"
    if ia.series_description and ib.series_description and (
        ia.series_description != ib.series_description
    ):
        return "their series descriptions differ"
    if ia.images_in_acquisition and ib.images_in_acquisition and (
        ia.images_in_acquisition != ib.images_in_acquisition
    ):
        return "their ImagesInAcquisition differ"
    return ""


def _takes(cand: Candidate, unit: Unit) -> bool:
    """Rule 3: whether the unit joins the candidate (same cluster and T1 weighting, slice
    positions that overlap, none of its (part, echo) keys yet, and the same echo train)."""
    return (
        cand.cluster == unit.cluster
        and cand.t1 == unit.t1
        and bool(cand.positions & unit.positions)
        and not cand.keys & unit.keys
        and _same_echo_train(cand, unit)
    )


def assemble_candidates(units: Iterable[Unit]) -> list[Candidate]:
    """Rule 3: the units, in series-number order per cluster, each joining the first candidate
    that takes it, else starting one."""
    candidates: list[Candidate] = []
    ordered_units = sorted(
        units,
        key=lambda u: (u.cluster, u.series_number is None, u.series_number or 0, u.series_uid),
    )
    for unit in ordered_units:
        target = next((c for c in candidates if _takes(c, unit)), None)
        if target is None:
            target = Candidate(unit.cluster, unit.t1)
            candidates.append(target)
        target.add(unit)
    return candidates
