"""Susceptibility referencing: QSM is relative, so a reference region is set to zero.

The default subtracts the mean over the whole brain mask (the usual choice in QSM challenge 2.0
and QSM-CI evaluations); with a CSF mask the mean over CSF is used instead (Straub et al., MRM
2017;78:204, "Suitable reference tissues for quantitative susceptibility mapping of the brain").
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def reference_chi(
    chi_ppm: NDArray[np.floating],
    mask: NDArray[np.bool_],
    *,
    csf_mask: NDArray[np.bool_] | None = None,
    min_csf_voxels: int = 20,
) -> tuple[NDArray[np.float32], float]:
    """χ minus the mean over the reference region, zero outside ``mask``; also that mean.

    The reference region is ``csf_mask & mask`` when given and large enough, else ``mask``.
    """
    chi = np.asarray(chi_ppm, dtype=np.float32)
    m = np.asarray(mask, dtype=bool)
    region = m
    if csf_mask is not None:
        csf = np.asarray(csf_mask, dtype=bool) & m
        if int(csf.sum()) >= min_csf_voxels:
            region = csf
    offset = float(chi[region].mean()) if region.any() else 0.0
    out = chi - np.float32(offset)
    out[~m] = 0.0
    return out, offset
