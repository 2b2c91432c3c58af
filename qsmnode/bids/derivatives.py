"""One unit of work: QSM (and, when asked, the M1 analysis) of one MEGRE acquisition, written
as BIDS derivatives under ``OUTPUT_DIR/qsmnode``.

Names follow the BIDS QSM and qMRI derivatives (``<name>`` is the acquisition's BIDS name
without echo and part, e.g. ``sub-01_ses-1_acq-fast_run-1``), in ``sub-<l>[/ses-<l>]/anat``:

===========================================  =================================  ========
file                                         what                               units
===========================================  =================================  ========
``<name>_Chimap.nii.gz``                     susceptibility χ, referenced       ppm
``<name>_R2starmap.nii.gz``                  R2*                                1/s
``<name>_T2starmap.nii.gz``                  T2*                                s
``<name>_desc-echocombined_T2starw.nii.gz``  echo-combined magnitude            a.u.
``<name>_desc-brain_mask.nii.gz``            brain mask                         -
``<name>_desc-qsm_mask.nii.gz``              where χ is defined                 -
``<name>_desc-total_fieldmap.nii.gz``        total field                        ppm
``<name>_desc-local_fieldmap.nii.gz``        local (tissue) field               ppm
``<name>_desc-m1_dseg.nii.gz`` (+ ``.tsv``)  M1 areas × cortical layers         -
``<name>_desc-m1_measurements.tsv``          per area and layer (+ ``.json``)   columns
===========================================  =================================  ========

Every NIfTI has a JSON sidecar (units, the method and parameters of every step, the qsmnode
version, echo times, field strength, B0 direction, reference region and source files), its
header says mm and names the quantity in ``descrip``. Files are written under a temporary name
and renamed; the acquisition's record (``logs/<name>.json``: done or failed, why, the outputs,
a fingerprint of the inputs and parameters) is written last, so a re-run skips exactly the
acquisitions whose record says done for the same inputs and parameters.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import resource
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qsmnode import __version__
from qsmnode.bids.layout import MegreAcquisition, sources_of
from qsmnode.qsm import DEFAULT_METHOD

PIPELINE_NAME = "qsmnode"
"""The derivatives folder under OUTPUT_DIR, and ``GeneratedBy.Name``."""
LOGS = "logs"
"""Folder (under the derivatives) of the per-acquisition records; listed in ``.bidsignore``."""
GROUP = "group"
"""Folder (under the derivatives) of the group level's table and figures."""


@dataclass(frozen=True)
class Options:
    """What the participant level is asked to do (part of every record's fingerprint).

    Attributes:
        m1: run the M1 analysis and write its segmentation and measurements.
        normative: a normative table (TOML) for the M1 z-scores; None: no z-scores.
        method: the QSM pipeline, a name of :data:`qsmnode.qsm.engine.METHODS`.
    """

    m1: bool = False
    normative: Path | None = None
    method: str = DEFAULT_METHOD


@dataclass(frozen=True)
class MapSpec:
    """One output map: where it comes from, its name and what it holds."""

    attribute: str
    """The :class:`~qsmnode.qsm.engine.QSMResult` attribute."""
    suffix: str
    """The name's ending after ``<name>_``, without extension."""
    units: str
    descrip: str
    description: str
    mask: bool = False


MAPS: tuple[MapSpec, ...] = (
    MapSpec("chi_ppm", "Chimap", "ppm", "magnetic susceptibility chi (ppm)",
            "Magnetic susceptibility χ, referenced (see ReferenceRegion); 0 outside the QSM "
            "mask."),
    MapSpec("r2star_per_s", "R2starmap", "1/s", "R2* (1/s)",
            "Transverse relaxation rate R2* from the magnitude decay; 0 outside the brain "
            "mask."),
    MapSpec("t2star_s", "T2starmap", "s", "T2* (s)",
            "T2* = 1/R2*; 0 where R2* is 0."),
    MapSpec("magnitude", "desc-echocombined_T2starw", "arbitrary",
            "echo-combined magnitude (a.u.)", "Magnitude combined over the echoes."),
    MapSpec("mask", "desc-brain_mask", "", "brain mask", "Brain mask.", mask=True),
    MapSpec("qsm_mask", "desc-qsm_mask", "", "QSM mask (where chi is defined)",
            "Where χ and the local field are defined: the brain mask less unreliable edges "
            "and what the inversion gives up.", mask=True),
    MapSpec("total_field_ppm", "desc-total_fieldmap", "ppm", "total field (ppm of B0)",
            "Total field fitted over the echoes, in ppm of B0; 0 outside the brain mask."),
    MapSpec("local_field_ppm", "desc-local_fieldmap", "ppm", "local field (ppm of B0)",
            "Local (tissue) field after background removal, in ppm of B0 (total field "
            "inversion: the field less that of the fitted background sources; single-step "
            "TV: the model field of χ)."),
)

MEASUREMENT_UNITS: Mapping[str, str] = {
    "chi_mean_ppm": "ppm", "chi_sd_ppm": "ppm", "chi_median_ppm": "ppm",
    "r2star_mean_per_s": "1/s", "thickness_mean_mm": "mm", "voxel_count": "voxels",
    "core_voxel_count": "voxels", "t2star_signal_ratio": "ratio", "chi_z": "SD",
    "t2star_signal_ratio_z": "SD",
}


def derivatives_root(output_dir: Path) -> Path:
    """``OUTPUT_DIR/qsmnode``."""
    return output_dir / PIPELINE_NAME


def record_path(root: Path, acquisition: MegreAcquisition) -> Path:
    """The acquisition's record under the derivatives root ``root``."""
    return root / LOGS / f"{acquisition.name}.json"


def output_path(root: Path, acquisition: MegreAcquisition, suffix: str, ext: str) -> Path:
    """``root/sub-…/[ses-…/]anat/<name>_<suffix><ext>``."""
    return root / acquisition.relative_folder / f"{acquisition.name}_{suffix}{ext}"


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` under a temporary name beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # unique across hosts
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (NaN as null, numpy scalars as numbers), atomically."""
    return write_text_atomic(path, json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def write_tsv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    """Write a BIDS TSV (``n/a`` for missing values and NaN), atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_tsv_cell(v) for v in row])
    return write_text_atomic(path, buffer.getvalue())


def _tsv_cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def qsm_params(method: str) -> Any:
    """The QSM engine's parameters of the named pipeline, read where the engine defines them."""
    from qsmnode.qsm.engine import METHODS

    return METHODS[method]


def parameters(options: Options) -> dict[str, Any]:
    """Every parameter of the run, as recorded in ``dataset_description.json`` and each
    record: the QSM engine's (``QSMParams.to_record()``: every setting, flat, with each step's
    method by name) and the participant options."""
    return {"qsm_method": options.method, "qsm": qsm_params(options.method).to_record(),
            "m1": options.m1,
            "normative_table": None if options.normative is None else str(options.normative)}


def fingerprint(acquisition: MegreAcquisition, options: Options) -> str:
    """A digest of what the outputs depend on: every input file (with its sidecar) by path,
    size and modification time, the parameters and the qsmnode version."""
    inputs = []
    for _, path in acquisition.files:
        side = path.with_name(path.name.replace(".nii.gz", ".json").replace(".nii", ".json"))
        for p in (path, side):
            try:
                st = p.stat()
                inputs.append([str(p), st.st_size, st.st_mtime_ns])
            except OSError:
                inputs.append([str(p), None, None])
    blob = json.dumps({"inputs": inputs, "parameters": _jsonable(parameters(options)),
                       "version": __version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def is_finished(root: Path, acquisition: MegreAcquisition, options: Options) -> bool:
    """True when the acquisition's record says done, for the same fingerprint, and every
    output it lists exists."""
    try:
        record = json.loads(record_path(root, acquisition).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("status") != "done":
        return False
    if record.get("fingerprint") != fingerprint(acquisition, options):
        return False
    return all((root / rel).is_file() for rel in record.get("outputs", []))


def dataset_description(options: Options, source: Path) -> dict[str, Any]:
    """The derivatives' ``dataset_description.json``."""
    return {
        "Name": "qsmnode: QSM, R2*/T2* maps and the M1 analysis",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{
            "Name": PIPELINE_NAME,
            "Version": __version__,
            "Description": "Multi-echo GRE to χ, R2* and T2* (qsmnode.qsm), and the M1 "
                           "cortical layer analysis (qsmnode.m1) when asked.",
            "Parameters": parameters(options),
        }],
        "DatasetLinks": {"raw": source.resolve().as_uri()},
        "SourceDatasets": [{"URL": source.resolve().as_uri()}],
    }


def prepare(output_dir: Path, options: Options, source: Path) -> Path:
    """Create ``OUTPUT_DIR/qsmnode`` with its ``dataset_description.json`` and
    ``.bidsignore``; the derivatives root."""
    root = derivatives_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "dataset_description.json", dataset_description(options, source))
    write_text_atomic(root / ".bidsignore", f"{LOGS}/\n{GROUP}/\n")
    return root


def _methods(params: Mapping[str, Any]) -> dict[str, Any]:
    """The method chosen at each step (every ``*_method`` field of the QSM parameters)."""
    return {k: v for k, v in params.items() if k.endswith("_method")}


def _reference_region(params: Mapping[str, Any], quality: Mapping[str, Any]) -> str:
    reference = params.get("reference")
    what = {"mask": "mean χ over the QSM mask (whole brain in view)",
            "csf": "mean χ over the CSF"}.get(str(reference), str(reference))
    offset = quality.get("reference_offset_ppm")
    return what if offset is None else f"{what}; offset removed {float(offset):.4g} ppm"


def _header_facts(gre: Any, acquisition: MegreAcquisition, bids_root: Path,
                  params: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "SoftwareName": PIPELINE_NAME,
        "SoftwareVersion": __version__,
        "EchoTime": list(gre.echo_times_s),
        "MagneticFieldStrength": gre.field_strength_t,
        "B0Direction": [round(float(v), 6) for v in gre.b0_direction],
        "B0DirectionSpace": "unit vector in voxel-index space (i, j, k) of this image",
        "VoxelSize": [round(float(v), 6) for v in gre.voxel_size_mm],
        "Sources": sources_of(acquisition, bids_root),
        "Methods": _methods(params),
    }


@functools.cache
def _m1_atlas() -> Any:
    from qsmnode.dicom.reference_data import load_m1_atlas

    return load_m1_atlas()


def _normative(path: Path | None) -> Any:
    if path is None:
        return None
    from qsmnode.node.normative import read_normative_table

    return read_normative_table(path)


def process_acquisition(acquisition: MegreAcquisition, bids_root: Path, output_dir: Path,
                        options: Options) -> dict[str, Any]:
    """Process one acquisition and write its derivatives and record; the record.

    Never raises for a problem of the input or of the processing: the record says
    ``"status": "failed"`` with the error (naming the acquisition), so a cohort goes on.
    """
    root = derivatives_root(output_dir)
    started = time.perf_counter()
    record: dict[str, Any] = {
        "acquisition": acquisition.name, "subject": acquisition.subject,
        "session": acquisition.session, "entities": dict(acquisition.entities),
        "fingerprint": fingerprint(acquisition, options), "qsmnode_version": __version__,
        "host": os.uname().nodename, "pid": os.getpid(),
    }
    try:
        record.update(_process(acquisition, bids_root, root, options))
        record["status"] = "done"
    except Exception as exc:  # every failure of one acquisition is its own, by name
        from qsmnode.dicom.nifti import BidsError

        text = str(exc) if isinstance(exc, BidsError) else f"{type(exc).__name__}: {exc}"
        if not text.startswith(acquisition.name):
            text = f"{acquisition.name}: {text}"
        record.update(status="failed", error=text)
    record["seconds"] = round(time.perf_counter() - started, 2)
    # the worker process's peak so far (it may have run other acquisitions before): for
    # sizing --memory-limit
    record["worker_peak_rss_mib"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    write_json(record_path(root, acquisition), record)
    return record


def _process(acquisition: MegreAcquisition, bids_root: Path, root: Path,
             options: Options) -> dict[str, Any]:
    from qsmnode.dicom.nifti import read_megre_files, write_niftis
    from qsmnode.dicom.reference_data import brain_prior_for
    from qsmnode.qsm.engine import run_qsm

    gre = read_megre_files(acquisition.file_map(), acquisition.name, bids_root)
    params = qsm_params(options.method)
    result = run_qsm(gre.magnitude, gre.phase, gre.echo_times_s, gre.voxel_size_mm,
                     gre.b0_direction, gre.field_strength_t, params,
                     brain_prior=brain_prior_for(gre.affine))
    param_dict = params.to_record()
    quality = {k: v for k, v in result.quality.items() if k != "params"}
    facts = _header_facts(gre, acquisition, bids_root, param_dict)
    reference = _reference_region(param_dict, quality)
    outputs: list[Path] = []
    paths = write_niftis([
        (getattr(result, spec.attribute).astype(np.uint8 if spec.mask else np.float32),
         gre.affine, output_path(root, acquisition, spec.suffix, ".nii.gz"),
         f"qsmnode {__version__}: {spec.descrip}") for spec in MAPS])
    for spec, path in zip(MAPS, paths, strict=True):
        sidecar: dict[str, Any] = {"Description": spec.description, **facts}
        if spec.mask:
            sidecar["Type"] = "Brain"
        else:
            sidecar["Units"] = spec.units
            sidecar["SkullStripped"] = True
        if spec.attribute == "chi_ppm":
            sidecar["ReferenceRegion"] = reference
        sidecar["QSMParameters"] = param_dict
        sidecar["QSMQuality"] = quality
        outputs += [path, write_json(path.with_name(path.name[:-7] + ".json"), sidecar)]
    summary: dict[str, Any] = {
        "shape": list(gre.shape), "echo_times_s": list(gre.echo_times_s),
        "field_strength_t": gre.field_strength_t, "quality": quality,
        "reference_region": reference,
    }
    if options.m1:
        m1_outputs, summary["m1"] = _m1(acquisition, root, gre, result, facts, options)
        outputs += m1_outputs
    summary["outputs"] = [p.relative_to(root).as_posix() for p in outputs]
    return summary


def _m1(acquisition: MegreAcquisition, root: Path, gre: Any, result: Any,
        facts: Mapping[str, Any], options: Options) -> tuple[list[Path], dict[str, Any]]:
    """The M1 analysis and its files. A failure of the analysis itself (e.g. a volume
    without cortex to register) is recorded and the maps stand; a bad normative table is the
    user's error and fails the acquisition."""
    from qsmnode.dicom.nifti import write_nifti
    from qsmnode.m1.analysis import analyse_m1
    from qsmnode.m1.result import AREAS, LAYERS, segment_label

    normative = _normative(options.normative)
    try:
        m1, seconds = analyse_m1(result.chi_ppm, result.r2star_per_s, result.magnitude,
                                 result.qsm_mask, gre.affine, _m1_atlas(), normative=normative)
    except (ValueError, RuntimeError) as exc:
        return [], {"error": f"the M1 analysis could not run: {exc}"}
    outputs: list[Path] = []
    dseg = output_path(root, acquisition, "desc-m1_dseg", ".nii.gz")
    outputs.append(write_nifti(m1.labels.astype(np.uint8), gre.affine, dseg,
                               f"qsmnode {__version__}: M1 areas x cortical layers"))
    outputs.append(write_json(dseg.with_name(dseg.name[:-7] + ".json"), {
        "Description": "M1 hand and foot areas of each hemisphere, each in thirds of cortical "
                       "depth (deep next to white matter); labels in the .tsv beside.",
        **facts, "Type": "M1 cortical layers"}))
    label_rows = [[segment_label(area, layer), f"{area}_{layer}", area, layer]
                  for area in AREAS for layer in LAYERS]
    outputs.append(write_tsv(dseg.with_name(dseg.name[:-7] + ".tsv"),
                             ["index", "name", "area", "layer"], label_rows))
    fields = [f.name for f in dataclasses.fields(m1.measurements[0])] if m1.measurements else []
    coverage = {f.name.removeprefix("coverage_"): f.passed for f in m1.flags
                if f.name.startswith("coverage_")}
    reliable = not any(f.name == "m1_measures_reliable" and not f.passed for f in m1.flags)
    rows = [[*(getattr(m, f) for f in fields), coverage.get(m.area), reliable]
            for m in m1.measurements]
    header = [*fields, "qc_area_covered", "qc_measures_reliable"]
    table = output_path(root, acquisition, "desc-m1_measurements", ".tsv")
    outputs.append(write_tsv(table, header, rows))
    columns = {name: {"Description": name.replace("_", " ")} for name in header}
    for name, unit in MEASUREMENT_UNITS.items():
        if name in columns:
            columns[name]["Units"] = unit
    flags = [dataclasses.asdict(f) for f in m1.flags]
    outputs.append(write_json(table.with_suffix(".json"), {
        **columns, "QualityFlags": flags, "Sources": facts["Sources"],
        "SoftwareVersion": __version__}))
    return outputs, {"flags": flags, "seconds": seconds, "reliable": reliable,
                     "normative_table": None if options.normative is None
                     else str(options.normative)}
