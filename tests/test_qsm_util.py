"""The QSM engine's array helpers (:mod:`qsmnode.qsm.util`) against scipy's own operators."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from scipy import ndimage

from qsmnode.qsm.util import Slabs, cg, erode_faces, farther_than, plane_blocks


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


def test_slabs_split_axis_0_into_consecutive_pieces() -> None:
    with ThreadPoolExecutor(2) as pool:
        for n, k in ((10, 2), (7, 3), (2, 5)):
            slabs = Slabs(n, pool, k)
            rows = [i for s in slabs.slices for i in range(n)[s]]
            assert rows == list(range(n)) and len(slabs.slices) == min(n, k)
            assert slabs.map(lambda s: s.stop - s.start) == [s.stop - s.start for s in slabs.slices]
    assert Slabs(9, None, 4).slices == [slice(0, 9)]  # no pool: one slab, the caller's thread


@pytest.mark.parametrize("preconditioned", [False, True])
def test_cg_in_slabs_solves_what_it_solves_serially(preconditioned: bool) -> None:
    # an SPD operator on a 3-D grid: a positive diagonal plus the periodic Laplacian's negative
    rng = np.random.default_rng(4)
    shape = (9, 6, 5)
    diag = (1.0 + rng.random(shape)).astype(np.float32)

    def apply(x: np.ndarray) -> np.ndarray:
        out = diag * x
        for a in range(3):
            out += 2 * x - np.roll(x, 1, axis=a) - np.roll(x, -1, axis=a)
        return out.astype(np.float32)

    rhs = rng.standard_normal(shape).astype(np.float32)
    precond = (lambda r: r / (diag + 6)) if preconditioned else None
    serial, n_serial, res_serial = cg(apply, rhs, tol=1e-6, max_iter=200, precond=precond)
    with ThreadPoolExecutor(2) as pool:
        threaded, n_threaded, res_threaded = cg(apply, rhs, tol=1e-6, max_iter=200,
                                                precond=precond, slabs=Slabs(9, pool, 3))
    for x, res in ((serial, res_serial), (threaded, res_threaded)):
        assert res < 1e-5
        np.testing.assert_allclose(apply(x), rhs, atol=1e-4)
    assert abs(n_threaded - n_serial) <= 1
