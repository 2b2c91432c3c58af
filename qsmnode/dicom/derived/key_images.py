"""Summary key images: RGB Secondary Captures a radiologist can read at a glance.

Each image shows one slice of the QSM map (grey, window −0.15..+0.15 ppm) with the M1 regions
outlined in their SEG colours, next to the table of values (all areas and layers) and the quality
flags. Two images: the slice with the most hand-area voxels (through the hand knob) and the one
with the most foot-area voxels. Without any M1 region, one image of the middle slice says so.

The slice is shown as a viewer shows the source: rows and columns of the DICOM pixel matrix,
with the patient-orientation letters of its edges. With a follow-up (the patient's earlier results,
:mod:`qsmnode.m1.followup`), the changes beyond the test–retest limit are listed in the warning
colour and a trend panel under the image plots deep-layer χ of each area at every earlier
study found and now (hollow grey: an earlier result not comparable). Text uses Pillow's
built-in font (ASCII and
Latin-1 only: "chi", not the Greek letter).

When QSM was not computed (e.g. a 2-D protocol with slice gaps: ``qsm_note`` says why), the
images show R2* (grey, window 0..80 s⁻¹) in place of χ, say so in the title and, in the warning
colour above the table, why; the table's χ cells are "-".
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from qsmnode.dicom.derived.common import (
    DEVICE_SERIAL_NUMBER,
    MANUFACTURER,
    MODEL_NAME,
    BuildContext,
)
from qsmnode.dicom.derived.segmentation import AREA_TEXT, segment_rgb
from qsmnode.dicom.geometry import slice_pixels
from qsmnode.m1.followup import FollowUp
from qsmnode.m1.result import AREAS, LAYERS, M1Result, Measurement, segment_label, segment_of

WINDOW_PPM = (-0.15, 0.15)
WINDOW_R2STAR = (0.0, 80.0)
"""Grey window of R2* (s⁻¹) when the key images show R2* because QSM was not computed."""
PANEL_PX = 512
"""Longest edge of the image panel in pixels."""
BACKGROUND = (16, 16, 16)
TEXT = (235, 235, 235)
MUTED = (150, 150, 150)
WARN = (255, 110, 90)
OK = (120, 220, 120)


@dataclass(frozen=True)
class KeySlice:
    """Which slice a key image shows and why."""

    k: int
    purpose: str  # "hand knob", "foot area", "middle slice"


def choose_slices(labels: NDArray[np.integer] | None, n_slices: int) -> list[KeySlice]:
    """The slice with the most hand voxels and the one with the most foot voxels (ties: the
    lower k); the middle slice when there is no M1 region at all."""
    out: list[KeySlice] = []
    if labels is not None:
        for part, purpose in (("hand", "hand knob"), ("foot", "foot area")):
            values = [
                segment_label(area, layer)
                for area in AREAS
                if area.endswith(part)
                for layer in LAYERS
            ]
            counts = np.isin(labels, values).sum(axis=(0, 1))
            if counts.max() > 0:
                out.append(KeySlice(int(np.argmax(counts)), purpose))
    if not out:
        out.append(KeySlice(n_slices // 2, "middle slice"))
    return out


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))
_PLAIN = str.maketrans({"³": "3", "²": "2", "–": "-", "—": "-", "−": "-", "χ": "chi",
                        "≥": ">=", "≤": "<=", "±": "+/-", "×": "x", "…": "..."})
"""Characters the built-in font lacks (in quality-flag texts), in ASCII."""
"""Patient directions of the LPS axes: (positive, negative)."""


def _orientation_letter(vector: NDArray[np.floating]) -> str:
    """The patient direction a unit vector (LPS) points to most."""
    axis = int(np.argmax(np.abs(vector)))
    positive, negative = _LETTERS[axis]
    return positive if vector[axis] > 0 else negative


def patient_orientation(orientation: tuple[float, ...]) -> tuple[str, str]:
    """Dominant letters of the row and column directions (PatientOrientation)."""
    o = np.asarray(orientation, dtype=np.float64)
    return _orientation_letter(o[:3]), _orientation_letter(o[3:])


def _opposite(letter: str) -> str:
    return {"L": "R", "R": "L", "A": "P", "P": "A", "H": "F", "F": "H"}[letter]


def _grey(image: NDArray[np.floating], lo: float, hi: float) -> NDArray[np.uint8]:
    scaled = (np.nan_to_num(image, nan=lo) - lo) / (hi - lo)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _outline(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """The inner 2-pixel rim of a mask (4-neighbour erosion, twice)."""
    inner = mask.copy()
    for _ in range(2):
        padded = np.pad(inner, 1, constant_values=False)
        inner = (
            padded[1:-1, 1:-1]
            & padded[:-2, 1:-1]
            & padded[2:, 1:-1]
            & padded[1:-1, :-2]
            & padded[1:-1, 2:]
        )
    return mask & ~inner


def render_panel(
    chi_slice: NDArray[np.floating],
    label_slice: NDArray[np.integer],
    pixel_spacing: tuple[float, float],
    window: tuple[float, float] = WINDOW_PPM,
) -> Image.Image:
    """The QSM slice (``Rows × Columns``; or any map, with its grey ``window``) in grey with
    coloured region outlines, resized to :data:`PANEL_PX` on its longest physical edge."""
    rows, cols = chi_slice.shape
    height_mm, width_mm = rows * pixel_spacing[0], cols * pixel_spacing[1]
    px_per_mm = PANEL_PX / max(height_mm, width_mm)
    size = (max(1, round(width_mm * px_per_mm)), max(1, round(height_mm * px_per_mm)))
    grey = Image.fromarray(_grey(chi_slice, *window)).resize(size, Image.Resampling.BILINEAR)
    rgb = np.stack([np.asarray(grey)] * 3, axis=-1)
    labels = np.asarray(
        Image.fromarray(label_slice.astype(np.uint8)).resize(size, Image.Resampling.NEAREST)
    )
    for value in np.unique(labels):
        if value == 0:
            continue
        rgb[_outline(labels == value)] = segment_rgb(*segment_of(int(value)))
    return Image.fromarray(rgb, mode="RGB")


def _fmt(value: float | None, digits: int) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"


def table_lines(m1: M1Result) -> list[tuple[str, tuple[int, int, int], list[str]]]:
    """``(swatch colour key, colour, cells)`` rows of the table of values."""
    out = []
    for area in AREAS:
        for layer in (*LAYERS, "all"):
            try:
                m: Measurement = m1.measurement(area, layer)
            except KeyError:
                continue
            colour = segment_rgb(area, layer if layer != "all" else "superficial")
            name = AREA_TEXT[area] if layer == LAYERS[0] else ""
            if not m.covered:
                cells = [name, layer, f"not covered (n={m.voxel_count})"]
            else:
                cells = [
                    name,
                    layer,
                    _fmt(m.chi_mean_ppm, 4),
                    _fmt(m.chi_sd_ppm, 4),
                    _fmt(m.chi_median_ppm, 4),
                    _fmt(m.chi_z, 1),
                    _fmt(m.t2star_signal_ratio, 2),
                    _fmt(m.r2star_mean_per_s, 1),
                    _fmt(m.thickness_mean_mm, 2),
                    str(m.voxel_count),
                ]
            out.append((f"{area}/{layer}", colour, cells))
    return out


TABLE_HEADER = [
    "area",
    "layer",
    "chi mean",
    "chi SD",
    "chi med",
    "z",
    "T2* ratio",
    "R2* 1/s",
    "thick mm",
    "voxels",
]
_COLUMN_CHARS = [11, 12, 9, 8, 9, 6, 10, 9, 9, 7]
Z_FLAG = 2.0
"""|z| at or beyond which a row is flagged, by default: the site sets it with ``[pipeline]
z_flag`` (passed as ``z_flag``; the Key Object Selection uses the same value)."""


def legend(z_flag: float = Z_FLAG) -> list[str]:
    """The legend under the table, naming the threshold ``z_flag``."""
    return [
        f"z: chi against the normative table; |z| >= {z_flag:g} flagged; '-': no norm for it,",
        "   or the M1 measures are not reliable (see the FAIL lines)",
        "T2* ratio: T2*-weighted signal / cortex at the same depth outside the four areas",
    ]


LEGEND = legend()
"""The legend with the default threshold."""


def findings(m1: M1Result, z_flag: float = Z_FLAG) -> list[str]:
    """What the reader should look at first: the finding, i.e. the deep layers whose |z| is
    ``z_flag`` or more (``FLAGGED``, as the Key Object Selection and the ORU say it), then the
    other layers beyond it (``beyond z``: their rows are in the warning colour too, but they are
    not the finding); without a deep layer beyond it, the largest left-right difference of the
    deep layers."""
    beyond = m1.beyond_z(z_flag)
    flagged = [m for m in beyond if m.layer == "deep"]
    others = [f"beyond z (not the deep-layer finding): {AREA_TEXT[m.area]} {m.layer}, "
              f"z {m.chi_z:+.1f}" for m in beyond if m.layer != "deep"]
    if flagged:
        return [f"FLAGGED  {AREA_TEXT[m.area]} {m.layer}: chi {m.chi_mean_ppm:+.4f} ppm, "
                f"z {m.chi_z:+.1f}" for m in flagged] + others
    lines = list(others)
    if not any(m.chi_z is not None for m in m1.measurements):
        lines.append("no z-scores (no normative table, or measures not reliable)")
    pair = m1.deep_asymmetry()
    ratio = None if pair is not None else m1.deep_asymmetry("t2star_signal_ratio")
    if pair is not None:
        limb, left, right = pair
        lines.append(f"largest left-right deep-layer difference: {limb} {left - right:+.4f} ppm "
                     f"(left {left:+.4f}, right {right:+.4f})")
    elif ratio is not None:  # no χ (QSM not computed): the T2* signal ratio
        limb, left, right = ratio
        lines.append(f"largest left-right deep-layer T2* ratio difference: {limb} "
                     f"{left - right:+.2f} (left {left:.2f}, right {right:.2f})")
    return lines


def follow_up_lines(follow_up: FollowUp) -> list[str]:
    """The follow-up's lines under the findings: what was compared (or why nothing was,
    wrapped to the table's width), then each change beyond its test–retest limit
    (``CHANGED …``)."""
    lines = textwrap.wrap(f"follow-up: {follow_up.note}".translate(_PLAIN), width=NOTE_CHARS,
                          subsequent_indent="  ")
    for c in follow_up.exceeding():
        per_year = "" if c.per_year is None else f", {c.per_year:+.4g}/year"
        lines.append(f"CHANGED  {AREA_TEXT[c.area]} {c.layer}: {_MEASURE_TEXT[c.measure]} "
                     f"{c.prior:.4g} -> {c.current:.4g} ({c.change:+.4g}{per_year}; "
                     f"limit {c.limit:g})")
    return lines


NOTE_CHARS = 100
"""Longest line of the follow-up note on the key image (the table's width)."""
_MEASURE_TEXT = {"chi_mean_ppm": "chi ppm", "thickness_mean_mm": "thickness mm",
                 "t2star_signal_ratio": "T2* ratio"}
TREND_H = 150
"""Height in pixels of the follow-up trend panel."""


_TREND = {
    # measure: (title, least half-range padding, value format)
    "chi_mean_ppm": ("deep-layer chi (ppm) over time", 0.005, "+.3f"),
    "t2star_signal_ratio": ("deep-layer T2* signal ratio over time (no QSM)", 0.01, ".3f"),
}
"""What the trend panel can plot: deep-layer χ, or the T2* signal ratio without QSM."""


def render_trend(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], m1: M1Result,
                 follow_up: FollowUp, measure: str = "chi_mean_ppm") -> None:
    """Deep-layer ``measure`` (χ by default; the T2* signal ratio of a 2-D protocol without
    QSM) of each area over time, one small chart per area inside ``box`` (x0, y0, x1, y1): a
    point per earlier study (filled if comparable, hollow grey if not) and now, joined in time
    order; each chart's range spans its points."""
    title, least_pad, fmt = _TREND[measure]
    x0, y0, x1, y1 = box
    small = _font(12)
    refused = {p.study_uid for p, _ in follow_up.not_comparable}
    now = follow_up.study_date
    gap = 10
    width = (x1 - x0 - gap * (len(AREAS) - 1)) // len(AREAS)
    draw.text((x0, y0), title, font=small, fill=MUTED)
    for n, area in enumerate(AREAS):
        cx0 = x0 + n * (width + gap)
        cy0, cy1 = y0 + 34, y1 - 18
        draw.text((cx0, y0 + 16), AREA_TEXT[area], font=small,
                  fill=segment_rgb(area, "deep"))
        points: list[tuple[float, float, bool]] = []
        for p in follow_up.history:
            value = p.values.get((area, "deep", measure))
            if value is not None and math.isfinite(value):
                points.append((p.study_date.toordinal(), value, p.study_uid not in refused))
        try:
            m = m1.measurement(area, "deep")
        except KeyError:
            m = None
        current = float(getattr(m, measure)) if m is not None and m.covered else float("nan")
        if now is not None and math.isfinite(current):
            points.append((now.toordinal(), current, True))
        draw.rectangle((cx0, cy0, cx0 + width, cy1), outline=(70, 70, 70))
        if not points:
            draw.text((cx0 + 4, cy0 + 4), "-", font=small, fill=MUTED)
            continue
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        lo, hi = min(ys), max(ys)
        pad = max(least_pad, 0.15 * (hi - lo))
        lo, hi = lo - pad, hi + pad
        span_x = max(xs) - min(xs) or 1.0

        def at(x: float, y: float, cx0: int = cx0, cy0: int = cy0, cy1: int = cy1,
               lo: float = lo, hi: float = hi, x_min: float = min(xs),
               span_x: float = span_x) -> tuple[float, float]:
            return (cx0 + 8 + (width - 16) * (x - x_min) / span_x,
                    cy1 - 6 - (cy1 - cy0 - 12) * (y - lo) / (hi - lo))

        xy = [at(x, y) for x, y, _ in points]
        if len(xy) > 1:
            draw.line(xy, fill=(200, 200, 200), width=1)
        for (px, py), (_, _, comparable) in zip(xy, points, strict=True):
            if comparable:
                draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=TEXT)
            else:
                draw.ellipse((px - 3, py - 3, px + 3, py + 3), outline=MUTED)
        if math.isfinite(current):
            px, py = xy[-1]
            draw.ellipse((px - 4, py - 4, px + 4, py + 4), fill=WARN if any(
                c.area == area and c.layer == "deep" and c.measure == measure
                for c in follow_up.exceeding()) else OK)
        draw.text((cx0 + 2, cy1 + 2), f"{lo:{fmt}}..{hi:{fmt}}", font=small, fill=MUTED)


def render_summary(
    chi_slice: NDArray[np.floating],
    label_slice: NDArray[np.integer],
    pixel_spacing: tuple[float, float],
    orientation: tuple[str, str],
    title: str,
    subtitle: str,
    m1: M1Result | None,
    m1_note: str | None = None,
    z_flag: float = Z_FLAG,
    follow_up: FollowUp | None = None,
    qsm_note: str | None = None,
) -> NDArray[np.uint8]:
    """The whole key image as ``Rows × Columns × 3`` uint8 RGB; a row whose |z| is ``z_flag``
    or more is flagged; with ``follow_up``, its lines and (with earlier results) the trend
    panel. With ``qsm_note`` (why QSM was not computed), ``chi_slice`` is R2* (s⁻¹), shown
    in :data:`WINDOW_R2STAR`, the note is written above the table, and the trend panel plots
    the deep-layer T2* signal ratio (there is no χ)."""
    window, unit = (WINDOW_R2STAR, "1/s") if qsm_note else (WINDOW_PPM, "ppm")
    panel = render_panel(chi_slice, label_slice, pixel_spacing, window)
    big, normal, small = _font(22), _font(15), _font(13)
    char_w = max(7, round(normal.getlength("0")))
    line_h = 20
    table_w = sum(_COLUMN_CHARS) * char_w + 40
    rows = table_lines(m1) if m1 is not None else []
    flags = list(m1.flags) if m1 is not None else []
    notes = findings(m1, z_flag) if m1 is not None else []
    if m1 is not None and follow_up is not None:
        notes += follow_up_lines(follow_up)
    trend_h = TREND_H if m1 is not None and follow_up is not None and follow_up.history else 0
    legend_lines = legend(z_flag)
    qsm_lines = textwrap.wrap(qsm_note.translate(_PLAIN), width=70)[:4] if qsm_note else []
    table_h = (len(rows) + len(flags) + len(notes) + len(legend_lines) + len(qsm_lines) + 8
               ) * line_h
    top = 70
    margin = 24
    width = margin + panel.width + margin + table_w + margin
    height = top + max(panel.height + 60 + trend_h, table_h) + margin
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((margin, 12), title, font=big, fill=TEXT)
    draw.text((margin, 42), subtitle, font=normal, fill=MUTED)

    # image panel with orientation letters and a grey bar
    x0, y0 = margin, top
    image.paste(panel, (x0, y0))
    row_dir, col_dir = orientation
    draw.text((x0 + panel.width // 2, y0 + 2), _opposite(col_dir), font=normal, fill=WARN)
    draw.text((x0 + panel.width // 2, y0 + panel.height - 20), col_dir, font=normal, fill=WARN)
    draw.text((x0 + 4, y0 + panel.height // 2), _opposite(row_dir), font=normal, fill=WARN)
    draw.text((x0 + panel.width - 16, y0 + panel.height // 2), row_dir, font=normal, fill=WARN)
    bar_y = y0 + panel.height + 12
    bar = np.tile(np.linspace(0, 255, 256).astype(np.uint8), (12, 1))
    image.paste(Image.fromarray(bar).convert("RGB"), (x0, bar_y))
    lo, hi = window
    if qsm_note:
        draw.text((x0, bar_y + 16), f"{lo:g}", font=small, fill=TEXT)
        draw.text((x0 + 112, bar_y + 16), f"{(lo + hi) / 2:g}", font=small, fill=TEXT)
        draw.text((x0 + 230, bar_y + 16), f"{hi:g} {unit}", font=small, fill=TEXT)
    else:
        draw.text((x0, bar_y + 16), f"{lo:+.2f}", font=small, fill=TEXT)
        draw.text((x0 + 112, bar_y + 16), "0", font=small, fill=TEXT)
        draw.text((x0 + 230, bar_y + 16), f"{hi:+.2f} {unit}", font=small, fill=TEXT)
    if trend_h and m1 is not None and follow_up is not None:
        render_trend(draw, (x0, bar_y + 40, x0 + max(panel.width, 360), bar_y + 40 + trend_h - 10),
                     m1, follow_up, "t2star_signal_ratio" if qsm_note else "chi_mean_ppm")

    # table of values
    tx = x0 + panel.width + margin
    ty = top
    for line in qsm_lines:
        draw.text((tx, ty), line, font=normal, fill=WARN)
        ty += line_h
    if qsm_lines:
        ty += line_h // 2
    if m1 is None:
        draw.text((tx, ty), "M1 analysis not available", font=normal, fill=WARN)
        for line in textwrap.wrap((m1_note or "").translate(_PLAIN), width=60)[:12]:
            ty += line_h
            draw.text((tx, ty), line, font=normal, fill=TEXT)
        return np.asarray(image, dtype=np.uint8).copy()
    draw.text((tx, ty), "M1 (ppm unless stated)", font=normal, fill=TEXT)
    ty += line_h + 4

    def put_cells(cells: list[str], y: int, colour: tuple[int, int, int]) -> None:
        x = tx + 16
        for text, chars in zip(cells, _COLUMN_CHARS, strict=False):
            draw.text((x, y), text, font=normal, fill=colour)
            x += chars * char_w

    put_cells(TABLE_HEADER, ty, MUTED)
    ty += line_h
    flagged = {(m.area, m.layer) for m in m1.beyond_z(z_flag)}
    for key, colour, cells in rows:
        draw.rectangle((tx, ty + 4, tx + 10, ty + 14), fill=colour)
        area, layer = key.split("/")
        warn = "not covered" in cells[-1] or (area, layer) in flagged
        put_cells(cells, ty, WARN if warn else TEXT)
        ty += line_h
    ty += line_h // 2
    for line in notes:
        warn = line.startswith(("FLAGGED", "CHANGED"))
        draw.text((tx, ty), line, font=normal, fill=WARN if warn else TEXT)
        ty += line_h
    ty += line_h // 2
    for line in legend_lines:
        draw.text((tx, ty), line, font=small, fill=MUTED)
        ty += line_h
    ty += line_h // 2
    for flag in flags:
        status = "PASS" if flag.passed else "FAIL"
        text = f"{status}  {flag.name}: {flag.text.translate(_PLAIN)}"
        draw.text((tx, ty), text, font=normal, fill=OK if flag.passed else WARN)
        ty += line_h
    return np.asarray(image, dtype=np.uint8).copy()


def _reference(ctx: BuildContext, k: int) -> Dataset:
    ref = ctx.sources.slice_source(k)
    item = Dataset()
    item.ReferencedSOPClassUID = ref.sop_class_uid
    item.ReferencedSOPInstanceUID = ref.sop_instance_uid
    if ref.frame_number is not None:
        item.ReferencedFrameNumber = ref.frame_number
    return item


def build_key_images(
    ctx: BuildContext, chi_ppm: NDArray[np.floating], m1: M1Result | None,
    m1_note: str | None = None, z_flag: float = Z_FLAG, follow_up: FollowUp | None = None,
    *, qsm_note: str | None = None, r2star_per_s: NDArray[np.floating] | None = None,
) -> list[hd.sc.SCImage]:
    """The summary Secondary Captures (one per chosen slice); ``m1_note`` says why there is
    no M1 analysis when ``m1`` is None; a row whose |z| is ``z_flag`` or more is flagged;
    ``follow_up`` adds the changes since earlier results and their trend. With ``qsm_note``
    (why QSM was not computed; ``chi_ppm`` is then unused) the images show ``r2star_per_s``
    and say why (see the module)."""
    shown = "QSM"
    if qsm_note:
        if r2star_per_s is None:
            raise ValueError("without QSM the key images show R2*: give r2star_per_s")
        chi_ppm, shown = r2star_per_s, "R2*"
    window, unit = (WINDOW_R2STAR, "1/s") if qsm_note else (WINDOW_PPM, "ppm")
    labels = None if m1 is None else np.asarray(m1.labels)
    if labels is not None and not labels.any():
        labels = None
    nk = ctx.shape[2]
    orientation = patient_orientation(ctx.geometry.orientation)
    source0 = ctx.sources.echo1()[0]
    out = []
    for index, choice in enumerate(choose_slices(labels, nk)):
        k = choice.k
        label_slice = (
            slice_pixels(labels, k) if labels is not None else np.zeros(chi_ppm.shape[1::-1])
        )
        pixels = render_summary(
            chi_slice=slice_pixels(chi_ppm, k),
            label_slice=label_slice,
            pixel_spacing=ctx.geometry.pixel_spacing,
            orientation=orientation,
            title=f"{shown} through the {choice.purpose}"
            + (" (QSM not computed)" if qsm_note else ""),
            subtitle=(
                f"slice {k + 1}/{nk}, window {window[0]:+.2f}..{window[1]:+.2f} {unit}; "
                f"{ctx.software_versions}; not for diagnosis without review"
            ),
            m1=m1,
            m1_note=m1_note,
            z_flag=z_flag,
            follow_up=follow_up,
            qsm_note=qsm_note,
        )
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source0,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            patient_orientation=orientation,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=("QSM M1 summary (key images)" if not qsm_note
                                else "M1 R2* summary (key images; no QSM)"),
            manufacturer_model_name=MODEL_NAME,
            software_versions=ctx.software_versions,
            device_serial_number=DEVICE_SERIAL_NUMBER,
            **{**ctx.highdicom_kwargs("sc", index), "manufacturer": MANUFACTURER},
            **ctx.dates(),
        )
        sc.copy_patient_and_study_information(source0)  # from_ref_dataset copies only some
        sc.BodyPartExamined = ctx.body_part
        sc.ImageComments = f"{shown} through the {choice.purpose}, slice {k + 1} of {nk}"
        if qsm_note:
            sc.ImageComments += f"; {qsm_note}"[:10240 - len(sc.ImageComments)]
        sc.DerivationDescription = (
            f"{shown} slice {k + 1} with M1 region outlines and the table of values, "
            f"by {ctx.software_versions}"
        )[:1024]
        sc.ReferencedImageSequence = [_reference(ctx, k)]
        source = _reference(ctx, k)
        purpose = Dataset()
        purpose.CodeValue = "121322"
        purpose.CodingSchemeDesignator = "DCM"
        purpose.CodeMeaning = "Source image for image processing operation"
        source.PurposeOfReferenceCodeSequence = [purpose]
        sc.SourceImageSequence = [source]
        sc.BurnedInAnnotation = "NO"
        out.append(sc)
    return out
