"""The pipeline: the one way to process an acquisition.

:func:`run_pipeline` takes a :class:`~qsmnode.dicom.load.LoadedAcquisition` and runs the stages
in order, each a small function that reads what earlier stages produced from a
:class:`_Context` and adds its own output:

1. ``check``: the loaded arrays are sane (finite magnitude, phase in [-π, π) when present,
   echo times ascending) and summarized (:class:`AcquisitionSummary`).
2. QSM, M1 analysis and derived datasets slot in after it (later issues).

The node's worker calls it in a child process (``qsmnode.node.jobs``), and the offline
``qsmnode process DIR`` is to call it too, so both give the same result. It knows nothing of
the network, the store or the configuration file: everything it needs comes in through its
arguments, and everything it makes goes out in the :class:`PipelineResult` (and, for later
stages, files under :attr:`PipelineParams.out_dir`).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qsmnode.dicom.load import LoadedAcquisition

PIPELINE_VERSION = "0.1"
"""Version of the processing: part of the result (and, later, of derived UIDs)."""


class PipelineError(RuntimeError):
    """The acquisition cannot be processed; the message says why in plain words."""


@dataclass(frozen=True)
class PipelineParams:
    """What the stages may need besides the acquisition.

    Attributes:
        out_dir: folder for files the stages write (None: the stages write no files). Created
            when needed.
    """

    out_dir: Path | None = None


@dataclass(frozen=True)
class AcquisitionSummary:
    """What was loaded: enough to check an acquisition against its source without arrays."""

    study_uid: str
    series_uids: tuple[str, ...]
    series_numbers: tuple[int | None, ...]
    vendor: str
    field_strength_t: float
    shape: tuple[int, int, int]
    """``(i, j, k)`` voxels."""
    n_echoes: int
    echo_times_s: tuple[float, ...]
    voxel_size_mm: tuple[float, float, float]
    affine: tuple[tuple[float, ...], ...]
    """4×4 voxel-to-RAS+ affine, rows."""
    b0_direction: tuple[float, float, float]
    has_phase: bool
    phase_scaling: str
    phase_sign: int
    magnitude_range: tuple[float, float]
    phase_range: tuple[float, float] | None


@dataclass(frozen=True)
class StageRecord:
    """One stage that ran, and how long it took."""

    name: str
    seconds: float


@dataclass(frozen=True)
class PipelineResult:
    """The outcome of :func:`run_pipeline`."""

    acquisition: AcquisitionSummary
    stages: tuple[StageRecord, ...]
    version: str = PIPELINE_VERSION

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dictionary (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))  # type: ignore[no-any-return]


@dataclass
class _Context:
    """What the stages share: the input, the parameters, and each stage's output."""

    loaded: LoadedAcquisition
    params: PipelineParams
    summary: AcquisitionSummary | None = None
    stages: list[StageRecord] = field(default_factory=list)


Stage = Callable[[_Context], None]


def _check(ctx: _Context) -> None:
    """The loaded arrays are sane; summarize them."""
    loaded, gre = ctx.loaded, ctx.loaded.gre
    magnitude = gre.magnitude
    if not np.isfinite(magnitude).all():
        bad = int(np.count_nonzero(~np.isfinite(magnitude)))
        raise PipelineError(f"the magnitude holds {bad} values that are not finite numbers")
    tes = gre.echo_times_s
    if any(b <= a for a, b in itertools.pairwise(tes)) or tes[0] <= 0:
        raise PipelineError(f"echo times are not positive and ascending: {tes}")
    phase_range = None
    if loaded.has_phase:
        phase = gre.phase
        if not np.isfinite(phase).all():
            bad = int(np.count_nonzero(~np.isfinite(phase)))
            raise PipelineError(f"the phase holds {bad} values that are not finite numbers")
        lo, hi = float(phase.min()), float(phase.max())
        pi = float(np.float32(np.pi))  # float32 π is a little above π: wrapped phase meets it
        if lo < -pi or hi >= pi:
            raise PipelineError(f"the phase spans {lo:.4f}..{hi:.4f} rad, outside [-π, π)")
        phase_range = (lo, hi)
    ctx.summary = AcquisitionSummary(
        study_uid=loaded.study_uid,
        series_uids=tuple(loaded.series_uids),
        series_numbers=tuple(loaded.series_numbers),
        vendor=str(loaded.vendor),
        field_strength_t=float(gre.field_strength_t),
        shape=tuple(int(n) for n in gre.shape),  # type: ignore[arg-type]
        n_echoes=gre.n_echoes,
        echo_times_s=tuple(float(t) for t in tes),
        voxel_size_mm=tuple(float(v) for v in gre.voxel_size_mm),  # type: ignore[arg-type]
        affine=tuple(tuple(float(v) for v in row) for row in np.asarray(gre.affine)),
        b0_direction=tuple(float(v) for v in gre.b0_direction),  # type: ignore[arg-type]
        has_phase=loaded.has_phase,
        phase_scaling=loaded.phase_scaling,
        phase_sign=loaded.phase_sign,
        magnitude_range=(float(magnitude.min()), float(magnitude.max())),
        phase_range=phase_range,
    )


STAGES: tuple[tuple[str, Stage], ...] = (
    ("check", _check),
    # ("qsm", _qsm), ("m1", _m1), ("derived", _derived): later issues
)
"""The stages, in order."""


def run_pipeline(loaded: LoadedAcquisition, params: PipelineParams | None = None
                 ) -> PipelineResult:
    """Process one loaded acquisition through every stage.

    Raises:
        PipelineError: a stage found the acquisition unfit; the message says why.
    """
    ctx = _Context(loaded, params or PipelineParams())
    if ctx.params.out_dir is not None:
        ctx.params.out_dir.mkdir(parents=True, exist_ok=True)
    for name, stage in STAGES:
        started = time.perf_counter()
        stage(ctx)
        ctx.stages.append(StageRecord(name, round(time.perf_counter() - started, 6)))
    assert ctx.summary is not None
    return PipelineResult(acquisition=ctx.summary, stages=tuple(ctx.stages))
