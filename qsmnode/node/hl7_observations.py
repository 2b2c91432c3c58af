"""What an ORU^R01 says about one result: its observations (OBX), as plain data.

:func:`observations` turns a job's M1 record (``result["m1"]`` of
:func:`qsmnode.pipeline.PipelineResult.to_json`: measurements, quality flags, or the error that
kept the analysis from running) into :class:`Observation` rows, in order:

1. the finding (``FINDING``): whether any area's deep-layer χ z-score reaches ``[hl7] z_high``
   (abnormal flag H/HH, or L/LL below the norm), or why nothing can be said ("not assessable"
   with the reason: no M1 analysis, measures not reliable, no normative table);
2. per M1 area: ``COVERAGE`` ("not assessable" when the slab does not cover it, status X), else
   per layer (deep, middle, superficial) χ mean in ppm (``CHI``), its z-score (``CHI-Z``), the
   T2*-weighted signal ratio (``T2S-RATIO``) and its z-score (``T2S-RATIO-Z``), and the
   area's cortical thickness in mm (``THICK``);
3. with a follow-up (``m1["follow_up"]``, issue 17): what was compared (``FOLLOWUP``, status X
   when nothing could be), then per area and layer the change since the earlier result of χ
   (``CHI-CHG``), of the T2*-weighted signal ratio (``T2S-RATIO-CHG``) and, per area, of the
   thickness (``THICK-CHG``), each with its change per year (``…-YR``); a change beyond its
   test–retest limit is flagged U or D (HL7 table 0078: significant change up, down);
4. the quality-control flags (``QC``), passed or failed with their text.

Codes are local (coding system ``99QSM``); units are UCUM (``[ppm]``, ``mm``, ``1``,
``{z-score}``). The sub-ID (OBX-4) names the area and layer (``L-HAND.DEEP``). Nothing here
reads a dataset or the store.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CODING_SYSTEM = "99QSM"
"""The local coding system of the observation identifiers (HL7: 99zzz is local)."""

AREA_CODES = {"left_hand": "L-HAND", "right_hand": "R-HAND", "left_foot": "L-FOOT",
              "right_foot": "R-FOOT"}
AREA_NAMES = {"left_hand": "left hand area", "right_hand": "right hand area",
              "left_foot": "left foot area", "right_foot": "right foot area"}
LAYER_CODES = {"deep": "DEEP", "middle": "MIDDLE", "superficial": "SUPERFICIAL", "all": "ALL"}
LAYERS = ("deep", "middle", "superficial")

UNIT_PPM = ("[ppm]", "parts per million")
UNIT_MM = ("mm", "millimeter")
UNIT_RATIO = ("1", "ratio")
UNIT_Z = ("{z-score}", "z-score")

NOT_ASSESSABLE = "not assessable"


@dataclass(frozen=True)
class Observation:
    """One OBX: ``value_type`` NM (a number), ST (text) or RP (a reference pointer);
    ``unit`` (UCUM code, text) for numbers; ``flag`` the abnormal flag (H, HH, L, LL, N or
    ""); ``status`` OBX-11 (P preliminary, X cannot be obtained)."""

    code: str
    text: str
    value_type: str
    value: str
    sub_id: str = ""
    unit: tuple[str, str] | None = None
    flag: str = ""
    status: str = "P"


@dataclass(frozen=True)
class Thresholds:
    """z-scores at or beyond ``high`` are flagged H (L below), at or beyond ``critical`` HH
    (LL)."""

    high: float = 2.0
    critical: float = 3.0


FLAG_RANK = {"": 0, "N": 0, "H": 1, "L": 1, "HH": 2, "LL": 2}


def abnormal_flag(z: float | None, thresholds: Thresholds) -> str:
    """HL7 table 0078 flag of a z-score: HH/H above, LL/L below, N within, "" without one."""
    if z is None or not math.isfinite(z):
        return ""
    if z >= thresholds.critical:
        return "HH"
    if z >= thresholds.high:
        return "H"
    if z <= -thresholds.critical:
        return "LL"
    if z <= -thresholds.high:
        return "L"
    return "N"


def number(value: float, digits: int = 4) -> str:
    """An NM value: at most ``digits`` significant decimals, no exponent, no trailing zeros."""
    text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _finite(value: Any) -> float | None:
    try:
        number_ = float(value)
    except (TypeError, ValueError):
        return None
    return number_ if math.isfinite(number_) else None


@dataclass(frozen=True)
class Finding:
    """The result in one line: ``text``, its worst abnormal flag and whether the M1 measures
    could be assessed at all."""

    text: str
    flag: str
    assessable: bool


def _unreliable(flags: Sequence[Mapping[str, Any]]) -> list[str]:
    from qsmnode.m1.result import RELIABILITY_CHECKS

    return [str(f.get("name")) for f in flags
            if f.get("name") in RELIABILITY_CHECKS and not f.get("passed")]


def finding(m1: Mapping[str, Any] | None, thresholds: Thresholds) -> Finding:
    """What the result says about the deep-layer χ (see the module docstring)."""
    if not m1:
        return Finding(f"{NOT_ASSESSABLE}: the M1 analysis is turned off on this node", "",
                       False)
    if m1.get("error"):
        return Finding(f"{NOT_ASSESSABLE}: {m1['error']}", "", False)
    measurements = [m for m in m1.get("measurements", ()) if isinstance(m, Mapping)]
    if not any(m.get("covered") for m in measurements):
        return Finding(f"{NOT_ASSESSABLE}: the slab covers none of the M1 hand and foot areas",
                       "", False)
    unreliable = _unreliable(m1.get("flags", ()))
    if unreliable:
        return Finding(f"{NOT_ASSESSABLE}: the M1 measures are not reliable (failed checks: "
                       f"{', '.join(unreliable)})", "", False)
    no_qsm = [f for f in m1.get("flags", ())
              if f.get("name") == "qsm_computed" and not f.get("passed")]
    if no_qsm:  # a 2-D protocol with slice gaps: R2*, T2* signal and thickness, no χ
        return Finding(f"{no_qsm[0].get('text')}; deep-layer susceptibility not graded; "
                       "R2*, T2* signal ratio and thickness reported", "", True)
    deep = [m for m in measurements if m.get("layer") == "deep" and m.get("covered")]
    scored = [(m, z) for m in deep if (z := _finite(m.get("chi_z"))) is not None]
    if not scored:
        return Finding("no z-scores: no normative table is configured for this node; "
                       "deep-layer susceptibility not graded", "", True)
    beyond = [(m, z, abnormal_flag(z, thresholds)) for m, z in scored
              if abs(z) >= thresholds.high]
    if not beyond:
        return Finding(f"deep-layer susceptibility within z +/-{number(thresholds.high, 2)} in "
                       f"the {len(scored)} covered area{'' if len(scored) == 1 else 's'}",
                       "N", True)
    parts = [f"{AREA_NAMES.get(str(m.get('area')), m.get('area'))} "
             f"{'raised' if z > 0 else 'lowered'} (z {number(z, 1)}, {flag})"
             for m, z, flag in beyond]
    worst = max((flag for _, _, flag in beyond), key=lambda f: FLAG_RANK[f])
    return Finding("deep-layer susceptibility beyond the norm: " + "; ".join(parts), worst, True)


def _measure_rows(m: Mapping[str, Any], sub_id: str, where: str,
                  thresholds: Thresholds) -> list[Observation]:
    rows = []
    for code, text, key, z_key, unit in (
            ("CHI", "Susceptibility (chi) mean", "chi_mean_ppm", "chi_z", UNIT_PPM),
            ("T2S-RATIO", "T2*-weighted signal ratio", "t2star_signal_ratio",
             "t2star_signal_ratio_z", UNIT_RATIO)):
        value = _finite(m.get(key))
        z = _finite(m.get(z_key))
        flag = abnormal_flag(z, thresholds)
        if value is not None:
            rows.append(Observation(code, f"{text}, {where}", "NM", number(value, 5 if
                                    unit is UNIT_PPM else 4), sub_id, unit, flag))
        if z is not None:
            rows.append(Observation(f"{code}-Z", f"{text} z-score, {where}", "NM", number(z, 2),
                                    sub_id, UNIT_Z, flag))
    return rows


CHANGES = {
    # measure: (code, text, unit, digits); χ and the ratio per layer, thickness per area
    "chi_mean_ppm": ("CHI-CHG", "Susceptibility (chi) mean change", UNIT_PPM, 5),
    "t2star_signal_ratio": ("T2S-RATIO-CHG", "T2*-weighted signal ratio change", UNIT_RATIO, 4),
    "thickness_mean_mm": ("THICK-CHG", "Cortical thickness change", UNIT_MM, 2),
}


def follow_up_rows(follow: Any) -> list[Observation]:
    """The OBX rows of a follow-up record (none without one)."""
    if not isinstance(follow, Mapping):
        return []
    prior = follow.get("prior") if isinstance(follow.get("prior"), Mapping) else None
    rows = [Observation("FOLLOWUP", "Comparison with earlier results", "ST",
                        str(follow.get("note", "")), status="P" if prior else "X")]
    since = f" since {prior.get('study_date')}" if prior else ""
    for c in follow.get("changes", ()):
        if not isinstance(c, Mapping) or c.get("measure") not in CHANGES:
            continue
        area, layer, measure = str(c.get("area")), str(c.get("layer")), str(c["measure"])
        if area not in AREA_CODES or (layer == "all") != (measure == "thickness_mean_mm"):
            continue
        change = _finite(c.get("change"))
        if change is None:
            continue
        code, text, unit, digits = CHANGES[measure]
        where = AREA_NAMES[area] + ("" if layer == "all" else f", {layer} layer")
        sub_id = f"{AREA_CODES[area]}.{LAYER_CODES[layer]}"
        flag = ("U" if change > 0 else "D") if c.get("exceeds") else ""
        rows.append(Observation(code, f"{text}{since}, {where}", "NM", number(change, digits),
                                sub_id, unit, flag))
        per_year = _finite(c.get("per_year"))
        if per_year is not None:
            rows.append(Observation(f"{code}-YR", f"{text} per year, {where}", "NM",
                                    number(per_year, digits), sub_id,
                                    (f"{unit[0]}/a", f"{unit[1]} per year"), flag))
    return rows


def observations(m1: Mapping[str, Any] | None, thresholds: Thresholds) -> list[Observation]:
    """The OBX rows of one result (see the module docstring), the finding first."""
    found = finding(m1, thresholds)
    rows = [Observation("FINDING", "M1 deep-layer susceptibility finding", "ST", found.text,
                        flag=found.flag if found.flag != "N" else "",
                        status="P" if found.assessable else "X")]
    if not m1 or m1.get("error"):
        return rows
    measurements = {(str(m.get("area")), str(m.get("layer"))): m
                    for m in m1.get("measurements", ()) if isinstance(m, Mapping)}
    for area, area_code in AREA_CODES.items():
        name = AREA_NAMES[area]
        whole = measurements.get((area, "all"))
        layers = [measurements.get((area, layer)) for layer in LAYERS]
        covered = [m for m in (whole, *layers) if m is not None and m.get("covered")]
        if not covered:
            voxels = max((int(m.get("voxel_count") or 0) for m in (whole, *layers)
                          if m is not None), default=0)
            rows.append(Observation(
                "COVERAGE", f"M1 coverage, {name}", "ST",
                f"{NOT_ASSESSABLE}: the slab does not cover the {name} ({voxels} voxels)",
                f"{area_code}.{LAYER_CODES['all']}", status="X"))
            continue
        for layer, m in zip(LAYERS, layers, strict=True):
            if m is None or not m.get("covered"):
                continue
            rows += _measure_rows(m, f"{area_code}.{LAYER_CODES[layer]}",
                                  f"{name}, {layer} layer", thresholds)
        thickness = _finite(None if whole is None else whole.get("thickness_mean_mm"))
        if thickness is not None:
            rows.append(Observation("THICK", f"Cortical thickness, {name}", "NM",
                                    number(thickness, 2), f"{area_code}.{LAYER_CODES['all']}",
                                    UNIT_MM))
    rows += follow_up_rows(m1.get("follow_up"))
    for index, flag in enumerate(m1.get("flags", ()), start=1):
        if not isinstance(flag, Mapping):
            continue
        passed = bool(flag.get("passed"))
        rows.append(Observation(
            "QC", f"Quality check {flag.get('name')}", "ST",
            f"{'passed' if passed else 'FAILED'}: {flag.get('text') or ''}".rstrip(": "),
            f"QC.{index}"))
    return rows
