"""A PNG preview of a simulation: magnitude, phase, true χ and the M1 areas, side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from qsmnode.sim.scanner import Simulation


def _grey(image: NDArray[np.floating], lo: float, hi: float) -> NDArray[np.uint8]:
    scaled = (np.clip((image - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    # Array [i, j] runs to the patient's left and posterior: rows j, columns i shows anterior
    # up and the patient's left on the right (radiological).
    return scaled.T


def write_preview(sim: Simulation, path: Path) -> Path:
    """An axial slice through the hand knob: magnitude (echo 1), phase (last echo), χ, M1."""
    t = sim.truth
    hand = np.argwhere(t.m1_areas == 1)
    k = int(np.median(hand[:, 2])) if hand.size else sim.gre.shape[2] // 2
    mag = sim.gre.magnitude[:, :, k, 0]
    panels = [
        _grey(mag, 0, float(np.percentile(mag, 99.5))),
        _grey(sim.gre.phase[:, :, k, -1], -np.pi, np.pi),
        _grey(t.chi_ppm[:, :, k], -0.1, 0.2),
        _grey(t.m1_areas[:, :, k].astype(np.float32), 0, 5),
    ]
    image = Image.fromarray(np.concatenate(panels, axis=1))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
