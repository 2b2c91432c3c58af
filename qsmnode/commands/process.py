"""``qsmnode process DIR --out OUT [--send DEST]``: the node's pipeline on a folder, offline.

Every acquisition in the folder is loaded and given to
:func:`qsmnode.pipeline.process_acquisition`, the entry point the node's worker uses too, with
the M1 atlas and the normative table read here (``[pipeline]`` of the configuration, or its
defaults) and, with ``[follow_up]``, the patient's earlier results looked up here. The derived
objects are written under ``OUT`` (:func:`qsmnode.dicom.files.write_datasets`) and, with
``--send``, C-STOREd over one association (resumed when it is lost). Nothing here goes
through the node's store, outbox, sender or workers.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from qsmnode.dicom.load import LoadedAcquisition
    from qsmnode.m1.analysis import M1Atlas
    from qsmnode.m1.measure import NormativeTable
    from qsmnode.node.config import PipelineConfig, Settings
    from qsmnode.pipeline import EarlierResults, PipelineResult


class Processor(Protocol):
    """What processes one loaded acquisition: :func:`qsmnode.pipeline.process_acquisition`
    (the default), or a stand-in with its signature (tests). It raises
    :class:`~qsmnode.pipeline.PipelineError` for an acquisition it finds unfit."""

    def __call__(self, loaded: LoadedAcquisition, source_files: Sequence[str | Path], *,
                 qsm: bool = ..., qsm_method: str = ..., m1_atlas: M1Atlas | None = ...,
                 normative: NormativeTable | None = ..., z_flag: float = ...,
                 earlier: EarlierResults | None = ...,
                 progress: Callable[[str], None] | None = ...) -> PipelineResult: ...


def run_process(folder: Path, out: Path, send: str | None = None, config: Path | None = None,
                processor: Processor | None = None, calling_ae: str | None = None) -> int:
    """``qsmnode process``: load every acquisition under ``folder``, run the pipeline
    (``processor``, default :func:`qsmnode.pipeline.process_acquisition`) and write the
    derived objects under ``out`` (``<study>/<series>/<sop>.dcm``); with ``send``, C-STORE
    them to that destination (a configured name, or HOST:PORT:AE). Returns the exit status: 0
    done, 1 an acquisition or the send failed, 2 bad arguments or configuration.

    As in a worker child, the patient and study values of the folder's files never reach the
    output: library warnings and log records are redacted
    (:func:`~qsmnode.node.logtext.redacted_library_output`), and so are the reasons printed
    (each ``<Keyword>`` instead of the value, control characters escaped)."""
    from qsmnode.node import logtext
    from qsmnode.node.redact import Redactor, dataset_values

    sources = [str(p) for p in sorted(folder.rglob("*")) if p.is_file()] if (
        folder.is_dir()) else []
    redactor = Redactor(dataset_values(sources))
    with logtext.redacted_library_output(redactor):
        return _run_process(folder, out, send, config, processor, calling_ae, sources,
                            lambda text: logtext.printable(redactor(text)))


class _ReferenceData:
    """The M1 atlas and the normative table of ``[pipeline]``, read at their first use (then
    kept for every acquisition of the folder)."""

    def __init__(self, pipeline: PipelineConfig) -> None:
        self.pipeline = pipeline
        self.with_m1 = pipeline.qsm and pipeline.m1
        self._atlas: M1Atlas | None = None
        self._normative: NormativeTable | None = None

    def atlas(self) -> M1Atlas | None:
        """The M1 atlas (None: no M1 analysis)."""
        if self.with_m1 and self._atlas is None:
            from qsmnode.dicom.reference_data import load_m1_atlas

            self._atlas = load_m1_atlas(atlas=self.pipeline.atlas)
        return self._atlas

    def normative(self) -> NormativeTable | None:
        """The normative table (None: no z-scores).

        Raises:
            NormativeTableError: the table cannot be read.
        """
        table = self.pipeline.m1_normative_table
        if self.with_m1 and table is not None and self._normative is None:
            from qsmnode.node.normative import load_normative_table

            self._normative = load_normative_table(str(table))
        return self._normative


def _run_process(folder: Path, out: Path, send: str | None, config: Path | None,
                 processor: Processor | None, calling_ae: str | None, sources: list[str],
                 clean: Callable[[str], str]) -> int:
    """:func:`run_process` within its redaction: ``sources`` are the folder's files, and
    ``clean`` makes a reason fit to print."""
    from qsmnode.dicom.files import write_datasets
    from qsmnode.dicom.load import LoadedAcquisition, load_folder
    from qsmnode.node.association import AssociationFailed, OutgoingFile, Peer
    from qsmnode.node.config import ConfigError, PipelineConfig, SenderConfig, load_settings
    from qsmnode.node.followup import FollowUpSource, find_priors
    from qsmnode.node.normative import NormativeTableError
    from qsmnode.node.storescu import send_resuming
    from qsmnode.pipeline import EarlierResults, PipelineError, process_acquisition

    settings: Settings | None = None
    # a destination name needs the configuration; HOST:PORT:AE (names have no colon) does not
    if config is not None or (send is not None and ":" not in send):
        try:
            settings = load_settings(config)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    peer = None
    if send is not None:
        try:
            peer = Peer.parse(send, settings.destinations if settings else (),
                              calling_ae or "QSMNODE")
        except ValueError as exc:
            print(f"error: --send {exc}", file=sys.stderr)
            return 2
    if not folder.is_dir():
        print(f"error: {folder}: not a folder", file=sys.stderr)
        return 2
    function: Processor = processor if processor is not None else process_acquisition
    started = time.perf_counter()
    rules = settings.rules if settings is not None else None
    found = load_folder(folder, min_echoes=rules.min_echoes if rules else 2,
                        require_phase=rules.require_phase if rules else True)
    for item in found:
        if not isinstance(item, LoadedAcquisition):
            print(f"skipped: {clean(item.reason)}", file=sys.stderr)
    acquisitions = [item for item in found if isinstance(item, LoadedAcquisition)]
    if not acquisitions:
        print(f"error: {folder}: no acquisition to process", file=sys.stderr)
        return 1
    pipeline = settings.pipeline if settings is not None else PipelineConfig()
    reference = _ReferenceData(pipeline)
    follow = FollowUpSource.from_settings(settings) if settings is not None else None
    status = 0
    written: list[tuple[Path, Any]] = []
    for loaded in acquisitions:
        numbers = ", ".join("?" if n is None else str(n) for n in loaded.series_numbers)
        if loaded.t1w_note:
            print(f"series {numbers}: {clean(loaded.t1w_note)}")
        if loaded.t1w_error:
            print(f"series {numbers}: {clean(loaded.t1w_error)}; the GRE is registered instead",
                  file=sys.stderr)
        try:
            try:
                normative = reference.normative()
            except NormativeTableError as exc:
                raise PipelineError(f"pipeline.m1_normative_table: {exc}") from None
            earlier = None
            if reference.with_m1 and follow is not None:
                priors, prior_note = find_priors(follow, loaded)
                earlier = EarlierResults(priors, prior_note, follow.limits)
            result = function(loaded, sources, qsm=pipeline.qsm,
                              qsm_method=pipeline.qsm_method, m1_atlas=reference.atlas(),
                              normative=normative, z_flag=pipeline.z_flag, earlier=earlier)
        except PipelineError as exc:
            print(f"series {numbers}: failed: {clean(str(exc))}", file=sys.stderr)
            status = 1
            continue
        except (ValueError, LookupError, AttributeError, TypeError) as exc:
            # from the input (a header the builders cannot use): a reason, not a traceback
            print(f"series {numbers}: failed: the input could not be handled "
                  f"({type(exc).__name__}: {clean(str(exc))})", file=sys.stderr)
            status = 1
            continue
        record, datasets = result.to_json(), list(result.datasets)
        if record.get("qsm_not_computed"):
            print(f"series {numbers}: {clean(record['qsm_not_computed'])}; R2* and the M1 "
                  "T2*-signal and thickness analysis are written instead", file=sys.stderr)
        m1_error = (record.get("m1") or {}).get("error")
        if m1_error:
            print(f"series {numbers}: {clean(m1_error)}; the maps are written without it",
                  file=sys.stderr)
        follow_up = (record.get("m1") or {}).get("follow_up")
        if follow_up:
            print(f"series {numbers}: follow-up: {clean(follow_up['note'])}")
        paths = write_datasets(datasets, out)
        written += list(zip(paths, datasets, strict=True))
        print(f"series {numbers}: {len(paths)} derived objects written under {out} "
              f"(study {loaded.study_uid})")
    print(f"processed {len(acquisitions)} acquisition(s) in {time.perf_counter() - started:.1f} s")
    if peer is None or not written:
        return status
    outgoing = [OutgoingFile(path, path, str(ds.SOPClassUID),
                             str(ds.file_meta.TransferSyntaxUID), str(ds.SOPInstanceUID))
                for path, ds in written]
    started = time.perf_counter()
    try:
        # a lost association is resumed from the first file not acknowledged (bounded)
        results, associations = send_resuming(peer, outgoing, (
            settings.sender if settings is not None else SenderConfig()).timeout_s)
    except AssociationFailed as exc:
        print(f"error: not sent to {peer}: {exc}", file=sys.stderr)
        return 1
    failed = {key: r for key, r in results.items() if not r.ok}
    resumed = f" ({associations} associations: resumed after a lost one)" if (
        associations > 1) else ""
    print(f"sent {len(results) - len(failed)} of {len(outgoing)} to {peer} in "
          f"{time.perf_counter() - started:.1f} s{resumed}")
    for path, result in failed.items():  # every file not stored, by name
        print(f"not sent: {Path(path).name}: {result.error}", file=sys.stderr)
    return 1 if failed else status
