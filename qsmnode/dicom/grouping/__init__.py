"""Group instance summaries into multi-echo GRE acquisitions, or say in plain words why not.

:func:`group_acquisitions` takes :class:`~qsmnode.dicom.headers.InstanceInfo` summaries (from
any number of series and studies) and returns one :class:`AcquisitionPlan` per complete
acquisition and one :class:`Problem` per set of images that cannot be processed.

The rules:

1. Instances are de-duplicated by SOP Instance UID (re-sent files); frames by frame number.
2. Frames are clustered by geometry: study, frame of reference, Rows × Columns,
   ImageOrientationPatient (within 1e-4), PixelSpacing (within 1e-4 mm) and ORIGINAL vs
   DERIVED. Slice positions are compared later, so a part that is a slice short stays in the
   acquisition and is reported rather than split off.
3. Within a cluster, each series (Enhanced and classic files of one series apart) is a unit
   holding a set of (part, echo) keys. Units are taken in series-number order and join the
   first candidate acquisition whose slice positions overlap theirs, which holds none of
   their keys yet, and whose echo train is theirs: they share an echo time with it, or the
   unit and every unit of the candidate have one echo time each (one series per echo);
   otherwise they start a new candidate. Series of one echo time each join only when their
   headers do not show two scans: not both echo number 1 (GE writes each single-echo scan
   as echo 1), the same series description, the same ImagesInAcquisition where given.
   This joins Siemens magnitude and phase series
   (n, n+1), Siemens XA series per echo and Philips mixed series, and keeps an exact repeat of
   the protocol (series 7, 8 after 5, 6) apart, as well as a scan of the same geometry with
   other echo times. A magnitude-only and a phase-only candidate of the same geometry are
   evaluated together (so their echo times are reported as mismatched).
   Slice positions are compared rounded to 0.01 mm; a position within 0.005 mm of one
   already seen is the same slice even across a rounding boundary.
4. Echo identity is the echo time rounded to 1 µs, never InstanceNumber or EchoNumbers.
5. A candidate becomes a plan only when it has magnitude and (if required) phase with the same
   echo times, all above 0, at least ``min_echoes`` echoes, every slice for every echo and
   part, exactly one image per slice, echo and part, and evenly spaced slices. Otherwise it is
   a Problem.

6. T1w reference. A candidate whose every instance looks T1-weighted
   (:attr:`~qsmnode.dicom.headers.InstanceInfo.t1_evidence`: inversion-prepared gradient echo,
   an MPRAGE-family sequence name, or a T1 series description; the rule is in
   :mod:`qsmnode.dicom.headers`) and that holds only magnitude (or unstated-part) images is
   never a Problem: T1-weighted series join no GRE candidate, and a T1-weighted candidate is
   an anatomical reference when it is one series, one echo, at least ``T1W_MIN_SLICES``
   evenly spaced slices with one image each, and voxels no coarser than ``T1W_MAX_VOXEL_MM``.
   Each plan takes the reference of its study with the plan's Frame of Reference UID (the
   DICOM geometry then relates the two); with several, the finest voxels (smallest voxel
   volume) win, then the latest series number, then the series UID. The plan says which in
   :attr:`AcquisitionPlan.t1w_note`, and why any other T1-weighted series of the study is
   not used (another Frame of Reference, unusable, not chosen).

7. Session triage. A scanner sends the whole session, and most of it is not for QSM. With
   ``pass_over`` (the default), series that are plainly not QSM candidates come back as
   :class:`PassedOver` with a one-line reason, not as a :class:`Problem`: a localiser, BOLD,
   ASL or diffusion series (ImageType/FrameType tokens such as ``FMRI``, ``ASL``,
   ``DIFFUSION``, else words of the series description), derived images (ImageType DERIVED,
   e.g. ADC, FA, relCBF), series without image plane geometry, and, among those that make no
   acquisition, a phase-difference field map and a single echo of magnitude only. A T1-weighted
   series that no acquisition uses is passed over too, with why. What still looked like a QSM
   candidate (phase images, or several echoes) and cannot be used stays a problem. A series
   whose description matches one of ``qsm_series`` (the site's QSM protocol names) is never
   passed over; ``pass_over=False`` makes every series that makes no acquisition a problem.
   A plan is never turned into a passed-over series, except a localiser, BOLD, ASL, diffusion
   or derived series (which ``min_echoes=1`` with ``require_phase=False`` would otherwise
   plan).

Limitation: with one series per echo (Siemens XA, no EchoNumbers), a scan of the same
geometry and series description whose echo times are all different, also in one series per
echo, still joins the acquisition as more echoes (nothing in the summaries tells the two
apart).

The package, one module a step:

- :mod:`~qsmnode.dicom.grouping.results`: what grouping returns (plans, problems, passed over);
- :mod:`~qsmnode.dicom.grouping.keys`: echo and slice position keys, geometry tolerances;
- :mod:`~qsmnode.dicom.grouping.records`: clusters, series units and candidates;
- :mod:`~qsmnode.dicom.grouping.series`: rules 1 and 2, summaries into series records;
- :mod:`~qsmnode.dicom.grouping.echo_train`: rule 3, series records into candidates;
- :mod:`~qsmnode.dicom.grouping.pairing`: magnitude-only and phase-only candidates together;
- :mod:`~qsmnode.dicom.grouping.echo_table`, :mod:`~qsmnode.dicom.grouping.evaluation` and
  :mod:`~qsmnode.dicom.grouping.plan`: rules 4 and 5, a candidate as a plan or its reasons;
- :mod:`~qsmnode.dicom.grouping.t1w`: rule 6, T1w references;
- :mod:`~qsmnode.dicom.grouping.triage`: rule 7, what is passed over;
- :mod:`~qsmnode.dicom.grouping.group`: :func:`group_acquisitions`, the rules in order;
- :mod:`~qsmnode.dicom.grouping.stored`: a plan as JSON and back (the store keeps it for the
  acquisition's job).

Import from ``qsmnode.dicom.grouping`` itself: the names below are its API; the modules'
other names are the package's own.
"""

from qsmnode.dicom.grouping.group import group_acquisitions
from qsmnode.dicom.grouping.keys import (
    ORIENTATION_TOL,
    POSITION_DECIMALS,
    SPACING_TOL_MM,
    echo_key,
)
from qsmnode.dicom.grouping.results import (
    AcquisitionPlan,
    FrameRef,
    PassedOver,
    Problem,
    T1wReference,
)
from qsmnode.dicom.grouping.stored import plan_from_json, plan_to_json
from qsmnode.dicom.grouping.t1w import T1W_MAX_VOXEL_MM, T1W_MIN_SLICES

__all__ = [
    "ORIENTATION_TOL",
    "POSITION_DECIMALS",
    "SPACING_TOL_MM",
    "T1W_MAX_VOXEL_MM",
    "T1W_MIN_SLICES",
    "AcquisitionPlan",
    "FrameRef",
    "PassedOver",
    "Problem",
    "T1wReference",
    "echo_key",
    "group_acquisitions",
    "plan_from_json",
    "plan_to_json",
]
