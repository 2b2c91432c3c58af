"""How grouping tells echoes, slices and geometries apart: the echo key (echo time to 1 µs,
rule 4), slice position keys (0.01 mm, rule 3), the geometry tolerances of a cluster (rule 2),
and how echo times and counts are written in reasons."""

from __future__ import annotations

import math

from qsmnode.dicom.headers import FrameInfo

ORIENTATION_TOL = 1e-4
"""Largest difference of direction cosines within one geometry cluster."""
SPACING_TOL_MM = 1e-4
"""Largest pixel spacing difference (mm) within one geometry cluster."""
POSITION_DECIMALS = 2
"""Slice positions are compared after rounding to 0.01 mm."""
PosKey = tuple[int, int, int]
"""Slice identity: the position in units of 0.01 mm (see :class:`PositionKeys`)."""
EchoKey = int
"""Echo identity: the echo time in µs."""


def echo_key(echo_time_s: float) -> EchoKey:
    """Echo identity: the echo time rounded to 1 µs."""
    return round(echo_time_s * 1e6)


def te_key(frame: FrameInfo) -> EchoKey | None:
    """The frame's echo key; None without a usable echo time (absent, NaN or infinite)."""
    te = frame.echo_time_s
    return None if te is None or not math.isfinite(te) else echo_key(te)


def _pos_key(position: tuple[float, float, float]) -> PosKey:
    """The position rounded to 0.01 mm."""
    return tuple(round(p * 10**POSITION_DECIMALS) for p in position)  # type: ignore[return-value]


_NEIGHBOURS = tuple((a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1))


class PositionKeys:
    """Slice position keys of one grouping: the position rounded to 0.01 mm, except that a
    position within half that of one already seen takes its key (so positions written with a
    tiny difference, e.g. 12.125 and 12.1250001, are one slice even across a rounding
    boundary)."""

    def __init__(self) -> None:
        self._keys: dict[tuple[float, float, float], PosKey] = {}
        self._seen: dict[PosKey, tuple[float, float, float]] = {}

    def __call__(self, position: tuple[float, float, float]) -> PosKey:
        key = self._keys.get(position)
        if key is not None:
            return key
        key = _pos_key(position)
        if key not in self._seen:
            half = 0.5 * 10.0**-POSITION_DECIMALS
            for offset in _NEIGHBOURS:
                near = tuple(k + o for k, o in zip(key, offset, strict=True))
                seen = self._seen.get(near)  # type: ignore[arg-type]
                if (
                    seen is not None
                    and max(abs(a - b) for a, b in zip(seen, position, strict=True)) <= half
                ):
                    key = near  # type: ignore[assignment]
                    break
            else:
                self._seen[key] = position
        self._keys[position] = key
        return key


def ms(key: EchoKey) -> str:
    """An echo key as milliseconds, for reasons."""
    return f"{key / 1000:g} ms"


def plural(n: int, word: str, plural: str | None = None) -> str:
    """``n`` and the word, in the plural (``word + 's'`` unless given) when ``n`` is not 1."""
    return f"{n} {word if n == 1 else (plural or word + 's')}"
