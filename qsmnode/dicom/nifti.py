"""NIfTI in and out: single volumes, and multi-echo GRE laid out as BIDS ``MEGRE``.

BIDS MEGRE (as dcm2niix and qsm-forward write it): one file per echo and part,
``<prefix>_echo-<n>_part-<mag|phase>_MEGRE.nii[.gz]``, each with a JSON sidecar giving
``EchoTime`` (s) and ``MagneticFieldStrength`` (T). Phase is in radians.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

from qsmnode.acquisition import MultiEchoGRE


class BidsError(ValueError):
    """A BIDS MEGRE folder that cannot be read; the message names the file and the problem."""


def write_nifti(volume: NDArray, affine: NDArray[np.float64], path: Path) -> Path:
    """Write one volume with its voxel-to-RAS affine (as both qform and sform)."""
    img = nib.Nifti1Image(np.asanyarray(volume), np.asarray(affine, dtype=np.float64))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def write_megre(gre: MultiEchoGRE, out_dir: Path, prefix: str = "sub-sim") -> list[Path]:
    """Write magnitude and phase of every echo as BIDS MEGRE NIfTI with JSON sidecars."""
    written = []
    for e, te in enumerate(gre.echo_times_s, start=1):
        for part, data in (("mag", gre.magnitude), ("phase", gre.phase)):
            stem = f"{prefix}_echo-{e}_part-{part}_MEGRE"
            written.append(write_nifti(data[..., e - 1], gre.affine, out_dir / f"{stem}.nii"))
            sidecar = {"EchoTime": te, "MagneticFieldStrength": gre.field_strength_t,
                       "EchoNumber": e}
            (out_dir / f"{stem}.json").write_text(json.dumps(sidecar, indent=2) + "\n")
            written.append(out_dir / f"{stem}.json")
    return written


_MEGRE = re.compile(
    r"(?P<prefix>.*)_echo-(?P<echo>\d+)_part-(?P<part>mag|phase)_MEGRE\.nii(\.gz)?$"
)


def read_megre(folder: Path) -> MultiEchoGRE:
    """Read a BIDS MEGRE acquisition (one prefix) from a folder.

    Phase is taken as radians; a phase whose range exceeds [-π, π] by far (scanner integers)
    is rescaled from its own min..max to [-π, π), as BIDS tools do.
    """
    found: dict[tuple[int, str], Path] = {}
    prefixes = set()
    for path in sorted(folder.iterdir()):
        m = _MEGRE.match(path.name)
        if m:
            prefixes.add(m["prefix"])
            found[(int(m["echo"]), m["part"])] = path
    if not found:
        raise BidsError(f"{folder}: no *_echo-N_part-mag|phase_MEGRE.nii[.gz] files")
    if len(prefixes) > 1:
        raise BidsError(f"{folder}: several acquisitions ({', '.join(sorted(prefixes))})")
    echoes = sorted({e for e, _ in found})
    for e in echoes:
        for part in ("mag", "phase"):
            if (e, part) not in found:
                raise BidsError(f"{folder}: echo {e} has no part-{part} file")
    mags, phases, tes, b0 = [], [], [], None
    affine = None
    for e in echoes:
        for part in ("mag", "phase"):
            path = found[(e, part)]
            img = nib.load(path)
            data = np.asarray(img.dataobj, dtype=np.float32)
            if data.ndim != 3:
                raise BidsError(f"{path}: expected a 3-D volume, got shape {data.shape}")
            if affine is None:
                affine = img.affine
            elif not np.allclose(img.affine, affine, atol=1e-3):
                raise BidsError(f"{path}: its affine differs from the first echo's")
            if part == "mag":
                mags.append(data)
                meta = _sidecar(path)
                if "EchoTime" not in meta:
                    raise BidsError(f"{_sidecar_path(path)}: no EchoTime")
                tes.append(float(meta["EchoTime"]))
                b0 = float(meta.get("MagneticFieldStrength", b0 or 0.0))
            else:
                phases.append(_as_radians(data))
    if not b0:
        raise BidsError(f"{folder}: no MagneticFieldStrength in the sidecars")
    return MultiEchoGRE(
        magnitude=np.stack(mags, axis=-1),
        phase=np.stack(phases, axis=-1),
        echo_times_s=tuple(tes),
        affine=np.asarray(affine, dtype=np.float64),
        field_strength_t=b0,
    )


def _sidecar_path(path: Path) -> Path:
    return path.with_name(re.sub(r"\.nii(\.gz)?$", ".json", path.name))


def _sidecar(path: Path) -> dict:
    side = _sidecar_path(path)
    if not side.exists():
        raise BidsError(f"{side}: missing JSON sidecar")
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError as exc:
        raise BidsError(f"{side}: not valid JSON ({exc})") from None


def _as_radians(phase: NDArray[np.float32]) -> NDArray[np.float32]:
    finite = phase[np.isfinite(phase)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if lo >= -np.pi - 0.01 and hi <= np.pi + 0.01:
        return np.nan_to_num(phase)
    scaled = (phase - lo) / (hi - lo) * (2 * np.pi) - np.pi
    return np.nan_to_num(scaled).astype(np.float32)
