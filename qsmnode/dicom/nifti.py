"""NIfTI in and out: single volumes, and multi-echo GRE laid out as BIDS ``MEGRE``.

BIDS MEGRE (as dcm2niix and qsm-forward write it): one file per echo and part,
``<prefix>_echo-<n>_part-<mag|phase>_MEGRE.nii[.gz]``, each with a JSON sidecar giving
``EchoTime`` (s) and ``MagneticFieldStrength`` (T). Phase is in radians.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from numpy.typing import NDArray

from qsmnode.acquisition import MultiEchoGRE

A = TypeVar("A")
R = TypeVar("R")


class BidsError(ValueError):
    """A BIDS MEGRE folder that cannot be read; the message names the file and the problem."""


DESCRIP_BYTES = 80
"""Room in the NIfTI-1 ``descrip`` header field (a longer text is cut)."""


def write_nifti(volume: NDArray, affine: NDArray[np.float64], path: Path,
                descrip: str | None = None) -> Path:
    """Write one volume with its voxel-to-RAS affine (as both qform and sform).

    The header says the spatial unit (mm) and the temporal one (s); ``descrip`` (at most
    :data:`DESCRIP_BYTES` bytes of ASCII, else cut) names the quantity, e.g. "chi (ppm)".
    The file is written under a temporary name in the same folder and renamed into place, so
    a reader (or a re-run looking for finished work) never sees half a file.
    """
    img = nib.Nifti1Image(np.asanyarray(volume), np.asarray(affine, dtype=np.float64))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units(xyz="mm", t="sec")
    if descrip is not None:
        text = descrip.encode("ascii", "replace")[:DESCRIP_BYTES - 1]
        img.header["descrip"] = text
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{suffix}")
    try:
        nib.save(img, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
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
    return read_megre_files(found, str(folder))


def read_megre_files(files: Mapping[tuple[int, str], Path], name: str,
                     root: Path | None = None) -> MultiEchoGRE:
    """Read one BIDS MEGRE acquisition given its files by ``(echo number, "mag"|"phase")``.

    ``name`` says which acquisition in the errors (a folder, or a BIDS name such as
    ``sub-01_ses-1``). Every echo needs both parts, ``EchoTime`` in its magnitude's metadata,
    and the first echo's shape and affine; phase is taken as :func:`read_megre` says. With
    ``root`` (the dataset's root folder), a file's metadata follows the BIDS inheritance
    principle (:func:`inherited_sidecar`): ``MagneticFieldStrength`` in a dataset-level
    ``MEGRE.json`` serves every echo; without it, only the file's own sidecar is read.

    Raises:
        BidsError: naming the acquisition or the file, and the problem.
    """
    if not files:
        raise BidsError(f"{name}: no *_echo-N_part-mag|phase_MEGRE.nii[.gz] files")
    echoes = sorted({e for e, _ in files})
    for e in echoes:
        for part in ("mag", "phase"):
            if (e, part) not in files:
                raise BidsError(f"{name}: echo {e} has no part-{part} file")
    mags, phases, tes, b0 = [], [], [], None
    affine = shape = None
    order = [(e, part) for e in echoes for part in ("mag", "phase")]
    volumes = _in_threads(_load_volume, [files[key] for key in order])
    for (e, part), (img_affine, data) in zip(order, volumes, strict=True):
        path = files[(e, part)]
        if data.ndim != 3:
            raise BidsError(f"{path}: expected a 3-D volume, got shape {data.shape}")
        if affine is None:
            affine, shape = img_affine, data.shape
        elif data.shape != shape:
            raise BidsError(f"{path}: shape {data.shape} differs from the first echo's "
                            f"{shape}")
        elif not np.allclose(img_affine, affine, atol=1e-3):
            raise BidsError(f"{path}: its affine differs from the first echo's")
        if part == "mag":
            mags.append(data)
            meta = _sidecar(path) if root is None else inherited_sidecar(path, root)
            if "EchoTime" not in meta:
                raise BidsError(f"{_sidecar_path(path)}: no EchoTime"
                                + ("" if root is None else " (nor in an inherited "
                                   "sidecar)"))
            try:
                tes.append(float(meta["EchoTime"]))
                b0 = float(meta.get("MagneticFieldStrength", b0 or 0.0))
            except (TypeError, ValueError):
                raise BidsError(f"{_sidecar_path(path)}: EchoTime and "
                                "MagneticFieldStrength must be numbers") from None
        else:
            phases.append(_as_radians(data))
    if not b0:
        raise BidsError(f"{name}: no MagneticFieldStrength in the sidecars")
    if len(set(tes)) != len(tes):
        raise BidsError(f"{name}: two echoes share an EchoTime ({', '.join(map(str, tes))} s)")
    return MultiEchoGRE(
        magnitude=np.stack(mags, axis=-1),
        phase=np.stack(phases, axis=-1),
        echo_times_s=tuple(tes),
        affine=np.asarray(affine, dtype=np.float64),
        field_strength_t=b0,
    )


def _load_volume(path: Path) -> tuple[NDArray[np.float64], NDArray[np.float32]]:
    """A NIfTI file's affine and its data as float32; :class:`BidsError` if unreadable."""
    try:
        img = nib.load(path)
        return img.affine, np.asarray(img.dataobj, dtype=np.float32)
    except (ImageFileError, OSError, ValueError, EOFError) as exc:
        raise BidsError(f"{path}: not a readable NIfTI file ({exc})") from None


def _in_threads(work: Callable[[A], R], items: Sequence[A]) -> list[R]:
    """``work`` on every item, on one thread per core (zlib releases the GIL while it
    inflates or deflates a ``.nii.gz``), results in order; the first error is raised."""
    if len(items) <= 1:
        return [work(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(len(items), os.cpu_count() or 1),
                            thread_name_prefix="nifti") as pool:
        return list(pool.map(work, items))


def write_niftis(volumes: Sequence[tuple[NDArray, NDArray[np.float64], Path, str | None]]
                 ) -> list[Path]:
    """:func:`write_nifti` of several ``(volume, affine, path, descrip)`` at once, compressed
    on one thread per core; the paths in order."""
    return _in_threads(lambda item: write_nifti(*item), volumes)


def _sidecar_path(path: Path) -> Path:
    return path.with_name(re.sub(r"\.nii(\.gz)?$", ".json", path.name))


_ENTITY = re.compile(r"^(?P<key>[a-zA-Z0-9]+)-(?P<value>[a-zA-Z0-9]+)$")


def _entities_and_suffix(name: str) -> tuple[dict[str, str], str] | None:
    """``({entity: label}, suffix)`` of a BIDS file name without its extension(s), e.g.
    ``sub-01_echo-1_part-mag_MEGRE`` → ``({sub: 01, echo: 1, part: mag}, MEGRE)``; None when
    a part is not ``key-label``."""
    *pairs, suffix = name.split("_")
    entities = {}
    for pair in pairs:
        m = _ENTITY.match(pair)
        if m is None:
            return None
        entities[m["key"]] = m["value"]
    return entities, suffix


def inherited_sidecar(path: Path, root: Path) -> dict:
    """The metadata of a BIDS image by the inheritance principle: every JSON file from the
    dataset ``root`` down to the image's folder with the image's suffix and a subset of its
    entities applies, a deeper one (and, in one folder, one with more entities) overriding
    a shallower one; the image's own sidecar, when there is one, last. A missing own sidecar
    is fine when inherited ones exist.

    Raises:
        BidsError: no sidecar applies, or one is not a JSON object.
    """
    parsed = _entities_and_suffix(re.sub(r"\.nii(\.gz)?$", "", path.name))
    own = _sidecar_path(path)
    if parsed is None:
        return _sidecar(path)
    entities, suffix = parsed
    folders = [root, *[root.joinpath(*path.parent.relative_to(root).parts[:n])
                       for n in range(1, len(path.parent.relative_to(root).parts) + 1)]]
    applicable: list[tuple[int, int, Path]] = []
    for depth, folder in enumerate(folders):
        for candidate in sorted(folder.glob(f"*{suffix}.json")):
            if candidate == own:
                continue
            found = _entities_and_suffix(candidate.name[: -len(".json")])
            if found is None and candidate.name == f"{suffix}.json":
                found = ({}, suffix)
            if found is None or found[1] != suffix:
                continue
            if all(entities.get(k) == v for k, v in found[0].items()):
                applicable.append((depth, len(found[0]), candidate))
    if own.exists():
        applicable.append((len(folders), len(entities) + 1, own))
    if not applicable:
        raise BidsError(f"{own}: missing JSON sidecar (and none inherited from {root})")
    meta: dict = {}
    for _, _, candidate in sorted(applicable):
        meta.update(_read_json_object(candidate))
    return meta


def _read_json_object(side: Path) -> dict:
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BidsError(f"{side}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise BidsError(f"{side}: expected a JSON object")
    return meta


def _sidecar(path: Path) -> dict:
    side = _sidecar_path(path)
    if not side.exists():
        raise BidsError(f"{side}: missing JSON sidecar")
    return _read_json_object(side)


def _as_radians(phase: NDArray[np.float32]) -> NDArray[np.float32]:
    finite = phase[np.isfinite(phase)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if lo >= -np.pi - 0.01 and hi <= np.pi + 0.01:
        return np.nan_to_num(phase)
    scaled = (phase - lo) / (hi - lo) * (2 * np.pi) - np.pi
    return np.nan_to_num(scaled).astype(np.float32)
