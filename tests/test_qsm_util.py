"""The QSM engine's array helpers (:mod:`qsmnode.qsm.util`) against scipy's own operators."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from qsmnode.qsm.util import erode_faces, farther_than, plane_blocks


def _blob(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) > -0.1


def test_face_erosion_matches_ndimage() -> None:
    m = _blob((15, 12, 9), 3)
    face = ndimage.generate_binary_structure(3, 1)
    for n in (1, 2):
        want = ndimage.binary_erosion(m, structure=face, iterations=n)
        np.testing.assert_array_equal(erode_faces(m, n), want)


@pytest.mark.parametrize("voxel_mm", [(1.0, 1.0, 1.0), (0.8, 0.8, 1.2), (3.0, 3.0, 3.6)])
@pytest.mark.parametrize("distance_mm", [2.0, 4.5, 8.0])
def test_farther_than_is_the_distance_transform_test(voxel_mm: tuple[float, float, float],
                                                      distance_mm: float) -> None:
    """The FFT ball count gives exactly the voxels whose Euclidean distance transform (scipy's,
    with the voxel size) exceeds the distance, including at ties and at the array's border."""
    m = _blob((40, 36, 30), 5)
    m[:, :, :4] = True  # a part touching the border: beyond the array counts as inside
    want = ndimage.distance_transform_edt(m, sampling=voxel_mm) > distance_mm
    np.testing.assert_array_equal(farther_than(m, voxel_mm, distance_mm), want)


def test_farther_than_a_full_mask_and_an_empty_one() -> None:
    full = np.ones((8, 8, 8), bool)
    np.testing.assert_array_equal(farther_than(full, 1.0, 3.0),
                                  ndimage.distance_transform_edt(full) > 3.0)
    assert not farther_than(np.zeros((8, 8, 8), bool), 1.0, 0.5).any()


def test_plane_blocks_cover_every_plane_once() -> None:
    for n, plane_bytes, block in ((10, 300, 1000), (7, 5000, 1000), (1, 1, 1 << 20)):
        blocks = list(plane_blocks(n, plane_bytes, block))
        covered = [i for s in blocks for i in range(n)[s]]
        assert covered == list(range(n))
        assert all(s.stop - s.start <= max(1, block // plane_bytes) for s in blocks)
