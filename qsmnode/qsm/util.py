"""Shared numerical helpers for the QSM steps: counted real FFTs, cropping, spheres, CG, face
erosion, a distance threshold, and blocks of planes for element-wise work (:func:`plane_blocks`).

Every FFT a step makes goes through :class:`FftGrid`, so a benchmark can report a step's wall
time in units of "one FFT on this grid" (``n_fft`` in the steps' info dicts).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypeVar

import numpy as np
import scipy.fft as sfft
from numpy.typing import ArrayLike, NDArray

from qsmnode.qsm.dipole import FFT_WORKERS

Slices = tuple[slice, slice, slice]
T = TypeVar("T")


@dataclass
class FftGrid:
    """Real FFTs (``rfftn``/``irfftn``) on one padded grid shape, with a call counter.

    Arrays smaller than ``shape`` are zero-padded at the high end of each axis, so a convolution
    with a kernel centred at index 0 wraps only into zeros when the pad is at least the kernel
    radius.
    """

    shape: tuple[int, int, int]
    n_fft: int = field(default=0)

    @property
    def half_shape(self) -> tuple[int, int, int]:
        """Shape of the half spectrum that ``rfftn`` returns."""
        return (self.shape[0], self.shape[1], self.shape[2] // 2 + 1)

    def forward(self, x: NDArray[np.float32]) -> NDArray[np.complex64]:
        """``rfftn`` of a real float32 array (zero-padded to ``shape``), complex64."""
        self.n_fft += 1
        return sfft.rfftn(x, s=self.shape, workers=FFT_WORKERS)

    def inverse(self, spectrum: NDArray[np.complex64]) -> NDArray[np.float32]:
        """``irfftn`` back to the full real grid, float32; the spectrum is kept. (Letting
        pocketfft overwrite it was slower: 162×200×180 on 2 cores, median 25.6 against 21.3
        ms; TFI on a 7T head 26.7 → 25.8 s.)"""
        self.n_fft += 1
        return sfft.irfftn(spectrum, s=self.shape, workers=FFT_WORKERS)

    def embed(self, x: NDArray[np.floating], dtype: type = np.float32) -> NDArray[np.float32]:
        """``x`` copied into the low corner of a zero array of the grid shape."""
        out = np.zeros(self.shape, dtype=dtype)
        out[: x.shape[0], : x.shape[1], : x.shape[2]] = x
        return out


PLANE_BLOCK_BYTES = 1 << 20
"""Bytes of the largest array per block of :func:`plane_blocks` (a core's L2 cache or so)."""


def plane_blocks(n_planes: int, plane_bytes: int,
                 block_bytes: int = PLANE_BLOCK_BYTES) -> Iterator[slice]:
    """Consecutive slices of axis 0 (``n_planes`` planes of ``plane_bytes`` each in the
    largest array), about ``block_bytes`` per slice: element-wise work done block by block
    keeps its temporaries in cache and reads a multi-echo array once, instead of once per
    echo and per operation."""
    step = max(1, block_bytes // max(plane_bytes, 1))
    for lo in range(0, n_planes, step):
        yield slice(lo, min(lo + step, n_planes))


@dataclass
class Slabs:
    """Consecutive slabs along axis 0 of one grid, worked on in parallel by a thread pool.

    NumPy releases the GIL in its element-wise loops and dot products, so memory-bound passes
    over a whole grid (the CG's vector updates, products with weights) run on every core when
    each thread takes one slab. Measured on a 162×200×180 float32 grid, 2 cores: a product
    3.6 → 1.5 ms, a dot product 1.6 → 1.0 ms. Without a pool (the default) there is one slab,
    the whole axis, and the work runs in the caller's thread.

    Args:
        n_rows: length of axis 0 of the arrays to split (a half spectrum has the same).
        pool: the thread pool, or None: serial.
        count: number of slabs (one per thread of ``pool``; at most ``n_rows``).
    """

    n_rows: int
    pool: Executor | None = None
    count: int = 1
    slices: list[slice] = field(init=False)

    def __post_init__(self) -> None:
        k = 1 if self.pool is None else max(1, min(self.count, self.n_rows))
        edges = [round(i * self.n_rows / k) for i in range(k + 1)]
        self.slices = [slice(lo, hi) for lo, hi in itertools.pairwise(edges)]

    def map(self, work: Callable[[slice], T]) -> list[T]:
        """``work(slab)`` for every slab (in the pool when there is more than one), in order."""
        if self.pool is None or len(self.slices) == 1:
            return [work(s) for s in self.slices]
        return list(self.pool.map(work, self.slices))

    def dot(self, a: NDArray[np.float32], b: NDArray[np.float32]) -> float:
        """``Σ a·b`` over the whole arrays, one partial sum per slab."""
        return sum(self.map(lambda s: float(np.dot(a[s].ravel(), b[s].ravel()))))

    def multiply(self, a: NDArray[Any], b: NDArray[Any], out: NDArray[Any]) -> None:
        """``out = a · b`` in slabs (all three with the slabs' axis-0 length)."""
        self.map(lambda s: np.multiply(a[s], b[s], out=out[s]))


_POOL: ThreadPoolExecutor | None = None

THREAD_MIN_VOXELS = 1 << 21
"""Grids smaller than this do light element-wise passes (a product, a CG update) faster in one
thread: the hand-off to the pool costs more than the second core gains. A product and a dot
product, 2 cores: 1.4 M voxels 1.07 ms serial, 1.32 ms in two slabs; 2.1 M 1.50 against
1.11 ms. (TFI's TV term, a dozen passes per call, gains from two slabs on any grid.)"""


def thread_slabs(n_rows: int, min_rows: int = 4, n_voxels: int | None = None) -> Slabs:
    """Slabs of axis 0 (length ``n_rows``) on the QSM steps' shared thread pool: one per FFT
    worker, each at least ``min_rows`` long (fewer on a short axis); one slab, in the caller's
    thread, when ``n_voxels`` (the grid's size, if given) is below :data:`THREAD_MIN_VOXELS`."""
    if n_voxels is not None and n_voxels < THREAD_MIN_VOXELS:
        return Slabs(n_rows)
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(FFT_WORKERS, 1), thread_name_prefix="qsm-slab")
    return Slabs(n_rows, _POOL, max(1, min(FFT_WORKERS, n_rows // min_rows)))


def keywords(params: Any) -> dict[str, Any]:
    """A method's parameter type (a dataclass) as the keywords of the method's function: its
    fields, less those not set at construction (``method``, the name it is recorded by)."""
    return {f.name: getattr(params, f.name) for f in fields(params) if f.init}


def time_one_fft(shape: tuple[int, int, int], repeats: int = 3) -> float:
    """Median wall time (s) of one rfftn + irfftn pair on ``shape``, divided by two."""
    import time

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        s = sfft.rfftn(x, workers=FFT_WORKERS)
        sfft.irfftn(s, s=shape, workers=FFT_WORKERS)
        times.append((time.perf_counter() - t0) / 2)
    return float(np.median(times))


def fast_shape(shape: tuple[int, ...], pad_voxels: ArrayLike) -> tuple[int, int, int]:
    """A fast real-FFT size at least ``shape + pad_voxels`` along each axis."""
    pad = np.broadcast_to(np.asarray(pad_voxels, dtype=int), (3,))
    return tuple(sfft.next_fast_len(int(n + p), real=True) for n, p in zip(shape, pad, strict=True))


def bounding_box(mask: NDArray[np.bool_], margin: ArrayLike = 0) -> Slices:
    """Slices of the smallest box holding every True voxel, grown by ``margin`` voxels per axis."""
    marg = np.broadcast_to(np.asarray(margin, dtype=int), (3,))
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        lo = max(int(idx[0]) - int(marg[axis]), 0)
        hi = min(int(idx[-1]) + 1 + int(marg[axis]), mask.shape[axis])
        out.append(slice(lo, hi))
    return tuple(out)


def crop_to_mask(
    field: NDArray[np.floating], mask: NDArray[np.bool_], voxel_size_mm: ArrayLike,
    pad_mm: float, extra_voxels: int = 0,
) -> tuple[Slices, FftGrid, NDArray[np.float32], NDArray[np.bool_]]:
    """The mask's bounding box, an FFT grid over it padded by ``pad_mm`` (plus
    ``extra_voxels``) per axis, and the field (float32, 0 outside the mask) and mask cropped
    to the box."""
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    box = bounding_box(mask)
    m = np.ascontiguousarray(mask[box], dtype=bool)
    f = np.asarray(field[box], dtype=np.float32) * m
    grid = FftGrid(fast_shape(m.shape, np.ceil(pad_mm / vs).astype(int) + extra_voxels))
    return box, grid, f, m


def block_mean(x: NDArray[np.generic], factors: tuple[int, int, int]) -> NDArray[np.generic]:
    """Mean over non-overlapping blocks (edge-padded to a multiple of the block size)."""
    if factors == (1, 1, 1):
        return x
    pad = [(0, (-n) % f) for n, f in zip(x.shape, factors, strict=True)]
    xp = np.pad(x, pad, mode="edge") if any(p for _, p in pad) else x
    n = [m // f for m, f in zip(xp.shape, factors, strict=True)]
    f = factors
    return xp.reshape(n[0], f[0], n[1], f[1], n[2], f[2]).mean(axis=(1, 3, 5))


def upsample_linear(
    x: NDArray[np.float32], factors: tuple[int, int, int], shape: tuple[int, ...]
) -> NDArray[np.float32]:
    """Linear interpolation from block centres back to the full grid (separable, per axis)."""
    out = x
    for axis, (f, n) in enumerate(zip(factors, shape, strict=True)):
        if f == 1:
            continue
        pos = (np.arange(n, dtype=np.float64) + 0.5) / f - 0.5
        pos = np.clip(pos, 0, out.shape[axis] - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, out.shape[axis] - 1)
        w = (pos - lo).astype(np.float32)
        view = [1, 1, 1]
        view[axis] = n
        w = w.reshape(view)
        low = np.take(out, lo, axis=axis)
        low *= 1 - w
        high = np.take(out, hi, axis=axis)
        high *= w
        low += high
        out = low
    return out.astype(np.float32, copy=False)


def sphere_kernel(grid: FftGrid, voxel_size_mm: ArrayLike, radius_mm: float) -> NDArray[np.float32]:
    """Half spectrum of the normalised spherical mean value (SMV) kernel of ``radius_mm``.

    The sphere is drawn in millimetres, so anisotropic voxels give an ellipsoid in index space;
    voxels whose centre lies within the radius count (a radius of one voxel is the 7-point
    stencil). The kernel is centred at index 0, so its spectrum is real.
    """
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    reach = np.floor(radius_mm / vs + 1e-6).astype(int)
    offsets = [np.arange(-r, r + 1) for r in reach]
    di, dj, dk = np.meshgrid(*offsets, indexing="ij")
    inside = (di * vs[0]) ** 2 + (dj * vs[1]) ** 2 + (dk * vs[2]) ** 2 <= radius_mm**2 * (1 + 1e-9)
    n = int(inside.sum())
    kernel = np.zeros(grid.shape, dtype=np.float32)
    kernel[di[inside] % grid.shape[0], dj[inside] % grid.shape[1], dk[inside] % grid.shape[2]] = (
        1.0 / n
    )
    grid.n_fft += 1
    return np.ascontiguousarray(sfft.rfftn(kernel, workers=FFT_WORKERS).real, dtype=np.float32)


def farther_than(mask: NDArray[np.bool_], voxel_size_mm: ArrayLike,
                 distance_mm: float) -> NDArray[np.bool_]:
    """Voxels of ``mask`` farther than ``distance_mm`` from every voxel off it: the same as
    ``ndimage.distance_transform_edt(mask, sampling=voxel_size_mm) > distance_mm`` (voxels
    beyond the array count as on), but by counting the off voxels in each voxel's ball
    with one FFT convolution (counts are whole numbers; float32 round-off stays far below the
    0.5 threshold), without the transform's index arrays. A mask with no voxel off has no
    distance to measure: it takes the transform itself."""
    m = np.asarray(mask, dtype=bool)
    if m.all() or m.ndim != 3:
        from scipy import ndimage

        return ndimage.distance_transform_edt(m, sampling=voxel_size_mm) > distance_mm
    vs = np.broadcast_to(np.asarray(voxel_size_mm, dtype=np.float64), (3,))
    reach = np.floor(distance_mm / vs).astype(int)
    di, dj, dk = np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij")
    # the transform's own distance: sqrt of the sum of squared, scaled index differences
    ball = np.sqrt((di * vs[0]) ** 2 + (dj * vs[1]) ** 2 + (dk * vs[2]) ** 2) <= distance_mm
    grid = FftGrid(fast_shape(m.shape, reach))
    kernel = np.zeros(grid.shape, np.float32)
    kernel[di[ball] % grid.shape[0], dj[ball] % grid.shape[1], dk[ball] % grid.shape[2]] = 1.0
    grid.n_fft += 1
    spectrum = np.ascontiguousarray(sfft.rfftn(kernel, workers=FFT_WORKERS).real,
                                    dtype=np.float32)
    del kernel
    count = convolve(grid, np.logical_not(m).astype(np.float32), spectrum)
    return count[: m.shape[0], : m.shape[1], : m.shape[2]] < 0.5


def erode_faces(mask: NDArray[np.bool_], iterations: int = 1) -> NDArray[np.bool_]:
    """Binary erosion by the 6-neighbourhood with voxels beyond the border off (as
    ``ndimage.binary_erosion`` with the face structure), by shifted slices."""
    out = mask
    for _ in range(iterations):
        src = out
        out = src.copy()
        for axis in range(3):
            n = src.shape[axis]

            def at(lo: int, hi: int, axis: int = axis) -> tuple[slice, ...]:
                return tuple(slice(lo, hi) if a == axis else slice(None) for a in range(3))

            out[at(1, n)] &= src[at(0, n - 1)]
            out[at(0, n - 1)] &= src[at(1, n)]
            out[at(0, 1)] = False
            out[at(n - 1, n)] = False
    return out


def convolve(
    grid: FftGrid, x: NDArray[np.float32], kernel: NDArray[np.float32],
    slabs: Slabs | None = None,
) -> NDArray[np.float32]:
    """Circular convolution of ``x`` (embedded in the grid) with a real half-spectrum kernel
    (the product with the kernel in ``slabs`` of axis 0, if given)."""
    spec = grid.forward(x)
    (slabs or Slabs(spec.shape[0])).multiply(spec, kernel, spec)
    return grid.inverse(spec)


def erode_sphere(
    grid: FftGrid, mask: NDArray[np.bool_], kernel: NDArray[np.float32], tol: float = 1e-3
) -> NDArray[np.bool_]:
    """Voxels whose whole SMV sphere lies inside ``mask`` (erosion by a sphere, via the FFT)."""
    smooth = convolve(grid, mask.astype(np.float32), kernel)
    return smooth > 1.0 - tol


def cg(
    apply: Callable[[NDArray[np.float32]], NDArray[np.float32]],
    rhs: NDArray[np.float32],
    x0: NDArray[np.float32] | None = None,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    precond: Callable[[NDArray[np.float32]], NDArray[np.float32]] | None = None,
    relative_to: Literal["rhs", "start"] = "rhs",
    slabs: Slabs | None = None,
) -> tuple[NDArray[np.float32], int, float]:
    """(Preconditioned) conjugate gradients for a symmetric positive (semi)definite operator.

    Hestenes & Stiefel 1952. Returns the solution, the number of iterations and the final
    relative residual ``|b − Ax| / |b|`` (of the recursively updated residual). float32.
    ``apply`` must return a new array: its result is reused as scratch. ``relative_to="start"``
    measures ``tol`` and the returned residual against the residual at ``x0`` instead of
    ``|b|``, so a warm start close to the solution still takes steps (TFI's reweightings).
    ``slabs`` (:class:`Slabs` of ``rhs``'s axis 0) runs the vector updates and dot products
    slab by slab on its thread pool; the sums then add in another order (float32 rounding).
    """
    sl = slabs if slabs is not None else Slabs(rhs.shape[0])
    b_norm = np.sqrt(sl.dot(rhs, rhs))
    if b_norm == 0.0 and relative_to == "rhs":
        return np.zeros_like(rhs), 0, 0.0
    if x0 is None or not np.any(x0):
        x = np.zeros_like(rhs)
        r = rhs.copy()
    else:
        x = x0.astype(np.float32, copy=True)
        r = rhs - apply(x)
    rr = sl.dot(r, r)
    if relative_to == "start":
        b_norm = np.sqrt(rr)
        if b_norm == 0.0:
            return x, 0, 0.0
    z = r if precond is None else precond(r)
    p = z.copy()
    tmp = np.empty_like(p)
    rz = rr if precond is None else sl.dot(r, z)
    it = 0
    while it < max_iter and np.sqrt(rr) > tol * b_norm:
        ap = apply(p)
        pap = sl.dot(p, ap)
        if pap <= 0.0:
            break
        alpha = np.float32(rz / pap)

        def update(s: slice, alpha: np.float32 = alpha, ap: NDArray[np.float32] = ap) -> float:
            x[s] += np.multiply(p[s], alpha, out=tmp[s])
            rs = r[s]
            rs -= np.multiply(ap[s], alpha, out=ap[s])
            return float(np.dot(rs.ravel(), rs.ravel()))

        rr = sum(sl.map(update))
        if precond is None:
            z, rz_new = r, rr
        else:
            z = precond(r)
            rz_new = sl.dot(r, z)
        beta = np.float32(rz_new / rz)

        def direction(s: slice, beta: np.float32 = beta, z: NDArray[np.float32] = z) -> None:
            ps = p[s]
            ps *= beta
            ps += z[s]

        sl.map(direction)
        rz = rz_new
        it += 1
    return x, it, float(np.sqrt(rr) / b_norm)


def laplacian_7pt(x: NDArray[np.float32], vs: NDArray[np.float64]) -> NDArray[np.float32]:
    """7-point Laplacian (1/mm²), zero beyond the array border."""
    out = np.zeros_like(x)
    for axis, h in enumerate(vs):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(None, -1)
        hi[axis] = slice(1, None)
        d = x[tuple(hi)] - x[tuple(lo)]
        d *= np.float32(1.0 / (h * h))
        out[tuple(lo)] += d
        out[tuple(hi)] -= d
    return out
