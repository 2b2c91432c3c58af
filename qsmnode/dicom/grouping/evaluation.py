"""Rule 5: whether a candidate makes a plan, else every reason it does not, in plain words (the
first reason that leaves nothing to check, or all reasons found, in a fixed order)."""

from __future__ import annotations

from qsmnode.dicom.grouping.echo_table import EchoTable, tabulate
from qsmnode.dicom.grouping.keys import EchoKey, PositionKeys, ms, plural, te_key
from qsmnode.dicom.grouping.plan import build_plan
from qsmnode.dicom.grouping.records import Candidate
from qsmnode.dicom.grouping.results import AcquisitionPlan, FrameRef, Problem
from qsmnode.dicom.headers import Part, Vendor


def _series_of(refs: list[FrameRef], part: Part, key: EchoKey | None = None) -> str:
    """The series numbers of the frames of ``part`` (of one echo when ``key`` is given)."""
    numbers = sorted(
        {
            r.instance.series_number
            for r in refs
            if r.frame.part is part and (key is None or te_key(r.frame) == key)
        },
        key=lambda n: (n is None, n or 0),
    )
    return ", ".join("?" if n is None else str(n) for n in numbers)


def _without_echo_time(table: EchoTable) -> str | None:
    """Images that have no usable echo time."""
    return f"{plural(table.no_te, 'image')} without an echo time" if table.no_te else None


def _no_magnitude(table: EchoTable) -> str | None:
    """Why there is nothing to build on: no magnitude image with an echo time."""
    if table.mag:
        return None
    extra = ""
    if table.others:
        listed = ", ".join(f"{n} {p.value}" for p, n in sorted(table.others.items()))
        extra = f" (found {listed} images; these are not combined)"
    what = "only phase images, no magnitude" if table.pha else "no magnitude or phase images"
    if table.no_te:
        what = f"{plural(table.no_te, 'image')} without an echo time, and {what} with one"
    return f"{what}{extra}"


def _phase_difference_phase(refs: list[FrameRef]) -> str | None:
    """Why the phase is a phase-difference field map (its headers say so), not per-echo phase."""
    fieldmap = [r for r in refs if r.frame.part is Part.PHASE and r.instance.phase_difference]
    if not fieldmap:
        return None
    names = sorted({r.instance.sequence_name for r in fieldmap if r.instance.sequence_name})
    how = f" (sequence {', '.join(names)})" if names else ""
    return (
        f"the phase in series {_series_of(fieldmap, Part.PHASE)} is a phase-difference "
        f"field map{how}, not a per-echo phase; QSM needs the phase of every echo"
    )


def _siemens_field_map(refs: list[FrameRef], table: EchoTable) -> str | None:
    """Why two magnitude echoes with one phase at the second echo time is a Siemens
    phase-difference field map (its headers do not say so), not per-echo phase."""
    mag_tes = table.mag_tes
    if not (refs[0].instance.vendor is Vendor.SIEMENS and len(mag_tes) == 2
            and table.pha_tes == [mag_tes[1]]):
        return None
    return (
        f"magnitude has 2 echoes ({ms(mag_tes[0])}, {ms(mag_tes[1])}) but phase "
        f"only one, at the second echo time: this looks like a Siemens "
        f"phase-difference field map, not a per-echo phase"
    )


def _non_positive_echo_times(table: EchoTable) -> str | None:
    """Echo times of 0 or less (not the echo of a gradient echo)."""
    not_positive = sorted({k for k in (*table.mag_tes, *table.pha_tes) if k <= 0})
    if not not_positive:
        return None
    return (
        f"echo time of 0 or less ({', '.join(ms(k) for k in not_positive)}): not the "
        "echo of a gradient echo"
    )


def _phase_pairing(table: EchoTable, refs: list[FrameRef], require_phase: bool) -> str | None:
    """Magnitude/phase pairing: phase missing (when required), or echo times that do not
    match between magnitude and phase."""
    mag_tes, pha_tes = table.mag_tes, table.pha_tes
    if not table.pha:
        if not require_phase:
            return None
        if table.others.get(Part.FIELD_MAP):
            return (
                f"no per-echo phase: magnitude ({plural(len(mag_tes), 'echo', 'echoes')}) and "
                f"a B0 field map ({plural(table.others[Part.FIELD_MAP], 'image')}) were "
                "found; QSM needs the phase of every echo"
            )
        return (
            f"no phase: only magnitude images ({plural(len(mag_tes), 'echo', 'echoes')}) "
            "were found; QSM needs the phase of every echo"
        )
    if mag_tes == pha_tes:
        return None
    only_m = [k for k in mag_tes if k not in table.pha]
    only_p = [k for k in pha_tes if k not in table.mag]
    detail = []
    if only_m:
        detail.append(
            f"magnitude (series {_series_of(refs, Part.MAGNITUDE)}) has TE "
            f"{', '.join(ms(k) for k in only_m)} with no matching phase"
        )
    if only_p:
        detail.append(
            f"phase (series {_series_of(refs, Part.PHASE)}) has TE "
            f"{', '.join(ms(k) for k in only_p)} with no matching magnitude"
        )
    return "mismatched echo times between magnitude and phase: " + "; ".join(detail)


def _too_few_echoes(table: EchoTable, min_echoes: int) -> str | None:
    """Fewer echoes than the rule needs."""
    n_echoes = len(table.mag_tes)
    if n_echoes >= min_echoes:
        return None
    return f"{plural(n_echoes, 'echo', 'echoes')}, the rule needs at least {min_echoes}"


def _repeated_slices(table: EchoTable) -> list[str]:
    """One image per slice, echo and part: each echo of a part with more than one image at a
    slice position."""
    reasons = []
    for part, echoes in table.parts.items():
        for key in sorted(echoes):
            dups = {p: rs for p, rs in echoes[key].items() if len(rs) > 1}
            if not dups:
                continue
            numbers = {r.frame.echo_number for rs in dups.values() for r in rs}
            numbers.discard(None)
            note = ""
            if len(numbers) > 1:
                note = (
                    f" with different echo numbers ({', '.join(map(str, sorted(numbers)))}): "
                    "the echo times do not tell the echoes apart (GE exports may repeat the "
                    "first TE)"
                )
            reasons.append(
                f"{part.value} TE {ms(key)} has more than one image at "
                f"{plural(len(dups), 'slice position')}{note}"
            )
    return reasons


def _missing_slices(table: EchoTable, refs: list[FrameRef]) -> str | None:
    """Every slice for every echo and part: which echoes of which part lack slices (led by
    "phase is one slice short of magnitude" when that is what happened)."""
    n_expected = len(table.slice_keys())
    short: list[tuple[Part, EchoKey, int]] = []
    for part, echoes in table.parts.items():
        for key in sorted(echoes):
            have = len(echoes[key])
            if have < n_expected:
                short.append((part, key, have))
    if not short:
        return None
    echo_index = {k: i + 1 for i, k in enumerate(table.mag_tes or table.pha_tes)}
    lines = []
    for part, key, have in short:
        missing = n_expected - have
        number = echo_index.get(key)
        which = f"echo {number} " if number else ""
        lines.append(
            f"{part.value} {which}(TE {ms(key)}, series "
            f"{_series_of(refs, part, key)}) has {have} of {n_expected} slices, "
            f"{plural(missing, 'slice')} missing"
        )
    mag_complete = all(len(table.mag[k]) == n_expected for k in table.mag)
    phase_short = [s for s in short if s[0] is Part.PHASE]
    if (table.pha and mag_complete and phase_short
            and all(s[2] == n_expected - 1 for s in short)):
        lead = (
            "phase is one slice short of magnitude"
            if len(phase_short) == len(table.pha)
            else "a phase slice is missing"
        )
    else:
        lead = "missing slices"
    return f"{lead}: " + "; ".join(lines)


def evaluate(
    cand: Candidate, min_echoes: int, require_phase: bool, pos_key: PositionKeys
) -> AcquisitionPlan | Problem:
    """The candidate as a plan (rule 5), or a problem: the first reason that leaves nothing to
    check (no magnitude; a phase-difference field map), else every reason found, in order."""
    refs = cand.refs
    table = tabulate(refs, pos_key)
    stop = (_no_magnitude(table) or _phase_difference_phase(refs)
            or _siemens_field_map(refs, table))
    if stop:
        return cand.problem(stop)
    reasons = [reason for reason in (
        _without_echo_time(table),
        _non_positive_echo_times(table),
        _phase_pairing(table, refs, require_phase),
        _too_few_echoes(table, min_echoes),
        *_repeated_slices(table),
        _missing_slices(table, refs),
    ) if reason]
    if reasons:
        return cand.problem("; ".join(reasons))
    return build_plan(cand, table)
