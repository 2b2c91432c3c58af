"""A small reader of the BIDS layout: every multi-echo GRE acquisition of a dataset.

One acquisition is the set of ``anat/*_echo-<n>_part-<mag|phase>_MEGRE.nii[.gz]`` files that
share every other entity (``sub``, ``ses``, ``acq``, ``run``, ``ce``, ``rec``, …), in
``sub-<label>/anat`` or ``sub-<label>/ses-<label>/anat``. Each is one unit of work.

Only what ``qsmnode qsm`` needs is read: file names and folders (the sidecars are read with
the images, by :func:`qsmnode.dicom.nifti.read_megre_files`). A file that does not parse
(an entity without a value, a subject or session that disagrees with its folder) is reported
with why, never silently passed over; an acquisition with a missing part is still listed, so
its failure can be reported by name when it is processed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LABEL = re.compile(r"^[A-Za-z0-9]+$")
"""A BIDS label: letters and digits only."""

_MEGRE_FILE = re.compile(r"^(?P<entities>.+)_MEGRE\.nii(\.gz)?$")
_PARTS = ("mag", "phase")


class LayoutError(ValueError):
    """The dataset or a selection cannot be used; the message names what and why."""


@dataclass(frozen=True)
class MegreAcquisition:
    """One multi-echo GRE acquisition of a BIDS dataset.

    Attributes:
        subject: the ``sub`` label (without ``sub-``).
        session: the ``ses`` label, or None in a dataset without sessions.
        entities: the other entities in file-name order, e.g. ``(("acq", "fast"), ("run",
            "1"))``; echo and part are not among them.
        folder: the ``anat`` folder holding the files.
        files: ``((echo, part), path)`` pairs, sorted.
    """

    subject: str
    session: str | None
    entities: tuple[tuple[str, str], ...]
    folder: Path
    files: tuple[tuple[tuple[int, str], Path], ...] = field(default=())

    @property
    def name(self) -> str:
        """The BIDS name of the acquisition without echo and part, e.g.
        ``sub-01_ses-1_acq-fast_run-1``: the prefix of its derivatives and its name in
        reports."""
        parts = [f"sub-{self.subject}"]
        if self.session is not None:
            parts.append(f"ses-{self.session}")
        parts += [f"{key}-{value}" for key, value in self.entities]
        return "_".join(parts)

    @property
    def relative_folder(self) -> Path:
        """``sub-<label>[/ses-<label>]/anat``: where it lives in the dataset (and where its
        derivatives go)."""
        folder = Path(f"sub-{self.subject}")
        if self.session is not None:
            folder /= f"ses-{self.session}"
        return folder / "anat"

    def file_map(self) -> dict[tuple[int, str], Path]:
        """The files by ``(echo, part)``."""
        return dict(self.files)

    def entity(self, key: str) -> str | None:
        """The value of one of :attr:`entities` (None when absent)."""
        return dict(self.entities).get(key)


@dataclass(frozen=True)
class Layout:
    """The acquisitions found, and the files passed over with why."""

    root: Path
    acquisitions: tuple[MegreAcquisition, ...]
    passed_over: tuple[str, ...] = ()


def normalise_labels(labels: Iterable[str] | None, prefix: str) -> list[str] | None:
    """``--participant-label`` / ``--session-label`` values without their optional ``sub-``
    or ``ses-`` prefix (BIDS Apps accept both), each checked to be a BIDS label.

    Raises:
        LayoutError: naming the label that is not letters and digits.
    """
    if labels is None:
        return None
    what = {"sub": "participant", "ses": "session"}[prefix]
    out = []
    for label in labels:
        bare = label[len(prefix) + 1:] if label.startswith(f"{prefix}-") else label
        if not LABEL.match(bare):
            raise LayoutError(f"{what} label {label!r} is not a BIDS label (letters and digits "
                              f"only, optionally after {prefix}-)")
        out.append(bare)
    return out


def parse_entities(stem: str) -> list[tuple[str, str]]:
    """The ``key-value`` entities of a file name stem (the part before ``_<suffix>``).

    Raises:
        ValueError: an entity without ``-``, an empty or non-alphanumeric key or value, or a
            key given twice.
    """
    pairs: list[tuple[str, str]] = []
    for chunk in stem.split("_"):
        key, sep, value = chunk.partition("-")
        if not sep or not LABEL.match(key) or not LABEL.match(value):
            raise ValueError(f"{chunk!r} is not a key-value entity")
        if any(k == key for k, _ in pairs):
            raise ValueError(f"entity {key!r} appears twice")
        pairs.append((key, value))
    return pairs


def _anat_folders(subject_dir: Path) -> list[tuple[str | None, Path]]:
    found: list[tuple[str | None, Path]] = []
    if (subject_dir / "anat").is_dir():
        found.append((None, subject_dir / "anat"))
    for ses in sorted(subject_dir.glob("ses-*")):
        if ses.is_dir() and (ses / "anat").is_dir():
            found.append((ses.name[4:], ses / "anat"))
    return found


def _scan_anat(subject: str, session: str | None, anat: Path, passed: list[str],
               ) -> list[MegreAcquisition]:
    groups: dict[tuple[tuple[str, str], ...], dict[tuple[int, str], Path]] = {}
    for path in sorted(anat.iterdir()):
        m = _MEGRE_FILE.match(path.name)
        if not m:
            continue
        try:
            pairs = parse_entities(m["entities"])
        except ValueError as exc:
            passed.append(f"{path}: not a BIDS name ({exc})")
            continue
        ent = dict(pairs)
        if ent.get("sub") != subject or pairs[0][0] != "sub":
            passed.append(f"{path}: its sub- entity does not match its folder sub-{subject}")
            continue
        if ent.get("ses") != session:
            where = "no session folder" if session is None else f"folder ses-{session}"
            passed.append(f"{path}: its ses- entity does not match its {where}")
            continue
        if "echo" not in ent or not ent["echo"].isdigit():
            passed.append(f"{path}: no numeric echo- entity (MEGRE needs one per echo)")
            continue
        if ent.get("part") not in _PARTS:
            passed.append(f"{path}: part-{ent.get('part', '?')} is not mag or phase "
                          "(qsmnode reads magnitude and phase)")
            continue
        rest = tuple((k, v) for k, v in pairs if k not in ("sub", "ses", "echo", "part"))
        key = (int(ent["echo"]), ent["part"])
        files = groups.setdefault(rest, {})
        if key in files:
            passed.append(f"{path}: a second file for echo {key[0]} part-{key[1]} "
                          f"(beside {files[key].name}); the first is used")
            continue
        files[key] = path
    return [MegreAcquisition(subject, session, rest, anat, tuple(sorted(files.items())))
            for rest, files in sorted(groups.items())]


def find_acquisitions(bids_dir: Path, participant_labels: Sequence[str] | None = None,
                      session_labels: Sequence[str] | None = None) -> Layout:
    """Every MEGRE acquisition of the dataset at ``bids_dir``, optionally of some participants
    and sessions only (labels with or without their ``sub-``/``ses-`` prefix).

    Raises:
        LayoutError: ``bids_dir`` is not a folder or holds no ``sub-*`` folder; a label is
            malformed or names a participant or session the dataset does not have; or nothing
            selected holds a MEGRE acquisition (the message says which).
    """
    if not bids_dir.is_dir():
        raise LayoutError(f"{bids_dir}: not a folder")
    subjects = normalise_labels(participant_labels, "sub")
    sessions = normalise_labels(session_labels, "ses")
    present = sorted(p.name[4:] for p in bids_dir.glob("sub-*") if p.is_dir())
    if not present:
        raise LayoutError(f"{bids_dir}: no sub-<label> folders (is it a BIDS dataset root?)")
    if subjects is not None:
        missing = [s for s in subjects if s not in present]
        if missing:
            raise LayoutError(
                f"{bids_dir}: no participant {', '.join(f'sub-{s}' for s in missing)} "
                f"(present: {_some(f'sub-{s}' for s in present)})")
    chosen = subjects if subjects is not None else present
    passed: list[str] = []
    acquisitions: list[MegreAcquisition] = []
    seen_sessions: set[str | None] = set()
    for subject in dict.fromkeys(chosen):
        for session, anat in _anat_folders(bids_dir / f"sub-{subject}"):
            seen_sessions.add(session)
            if sessions is not None and session not in sessions:
                continue
            acquisitions += _scan_anat(subject, session, anat, passed)
    if sessions is not None:
        missing = [s for s in sessions if s not in seen_sessions]
        if missing:
            raise LayoutError(
                f"{bids_dir}: no session {', '.join(f'ses-{s}' for s in missing)} in the "
                f"participants selected")
    if not acquisitions:
        which = "the participants and sessions selected" if (
            subjects is not None or sessions is not None) else f"any of {len(present)} subjects"
        raise LayoutError(
            f"{bids_dir}: no anat/*_echo-<n>_part-<mag|phase>_MEGRE.nii[.gz] files in {which}"
            + (f" ({len(passed)} passed over: {passed[0]})" if passed else ""))
    return Layout(bids_dir, tuple(acquisitions), tuple(passed))


def _some(names: Iterable[str], limit: int = 8) -> str:
    items = list(names)
    more = f", … ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def sources_of(acquisition: MegreAcquisition, root: Path) -> list[str]:
    """The acquisition's files (images and sidecars) as BIDS URIs relative to the raw
    dataset (``bids:raw:sub-01/anat/…``), for the derivatives' ``Sources``."""
    out = []
    for _, path in acquisition.files:
        side = path.with_name(re.sub(r"\.nii(\.gz)?$", ".json", path.name))
        for p in (path, side):
            try:
                rel = p.relative_to(root)
            except ValueError:
                rel = p
            if p is path or p.exists():
                out.append(f"bids:raw:{rel.as_posix()}")
    return out


def describe(layout: Layout) -> Mapping[str, int]:
    """Counts for a one-line summary: acquisitions, subjects, sessions."""
    return {
        "acquisitions": len(layout.acquisitions),
        "subjects": len({a.subject for a in layout.acquisitions}),
        "sessions": len({(a.subject, a.session) for a in layout.acquisitions}),
    }
