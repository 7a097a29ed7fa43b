"""Rigid co-registration by Mattes mutual information (SimpleITK), in world space.

Conventions
-----------
* Inputs are NIfTI arrays with their voxel-to-world affines (RAS+ mm). ITK works
  in LPS+ physical space, so every affine is converted with
  ``LPS = diag(-1, -1, 1) @ RAS`` before an image is handed to SimpleITK, and
  every ITK transform is converted back; callers only ever see RAS matrices.
* ``register_rigid`` returns a 4x4 ``transform`` mapping points of the MOVING
  image's world to the FIXED (reference) world: the moving image's effective
  affine is ``transform @ affine`` (``geometry.compose``). ITK's own result maps
  the other way (fixed points to moving points, the "pull" direction used for
  resampling), which is why it is inverted here.
* Thick-slice images are registered on their own grids: a per-level pyramid
  smooths and resamples each axis to ``max(spacing, level_mm)``, so a 1x1x4 mm
  stack is never blurred or shrunk across its 4 mm slices by the same voxel
  factor as in-plane (SimpleITK's built-in shrink factors are per level, not
  per axis). Each image is also blurred along the other's thick direction
  (``_match_variance``) so both see every edge with the same blur.
* Acceptance: the finest level is run both from the pyramid's result and from
  the start (headers or ``initial``); the best of start and the two results by
  MI over every masked voxel is returned, so registration never leaves a pair
  worse aligned, by its own metric, than its headers. With ``min_motion_mm``
  and ``min_gain`` the start is also kept when the best pose moves the fixed
  foreground by less than ``min_motion_mm`` on average, or improves MI by less
  than the fraction ``min_gain``: between contrasts with different slice
  directions the MI optimum itself lies 0.2-0.45 mm from the truth
  (docs/registration.md), so a small correction, or one the metric barely
  prefers, of scans that share the scanner frame is that bias, not motion.
* Determinism: metric samples are drawn with a fixed seed and a fixed sample
  count, and the thread count is fixed (``threads``), so the same call gives
  the same transform (up to ~1e-13 from the order of ITK's threaded sums).

Transform files (``save_transform``) are ITK text transforms
(``#Insight Transform File V1.0``, ``AffineTransform_double_3_3``), readable by
ANTs ``antsApplyTransforms``, ITK-SNAP, SimpleITK and nitransforms. Following
the BIDS/fMRIPrep convention for ``_from-<src>_to-<ref>_mode-image_xfm.txt``,
the file holds the ITK transform that resamples the *source* image onto the
*reference*: it maps reference (LPS) points to source (LPS) points, i.e. the
inverse of ``transform``, in LPS.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .geometry import voxel_sizes

logger = logging.getLogger(__name__)

#: RAS <-> LPS flip (its own inverse), as a 4x4 homogeneous matrix.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Pyramid levels (mm): each axis is smoothed and resampled to max(spacing, level).
LEVELS_MM = (8.0, 4.0, 2.0)
#: Number of metric samples per iteration (fixed, for speed and determinism).
SAMPLES = 40_000
#: Mattes MI histogram bins.
BINS = 32
#: Iteration cap per level.
ITERATIONS = 200
#: Step shrink factor when the gradient direction reverses (0.8: slower, steadier).
RELAXATION = 0.8
#: Smallest optimizer step, as a fraction of the level's spacing (mm).
MIN_STEP = 0.005
#: Masks are dilated by this much (mm) so that the object's outline, the
#: strongest edge shared by all contrasts, is sampled by the metric.
MASK_MARGIN_MM = 8.0
#: Scans of one session keep their headers' alignment unless registration moves
#: the reference foreground by at least this much on average (mm) AND improves
#: MI by at least the fraction HEADER_TRUST_GAIN. On aligned thick-slice pairs
#: the MI optimum's own offset moves the foreground by up to 0.8 mm and gains up
#: to 1.2 %; a real 0.8 mm motion on a clinical session gains 3 % and simulated
#: motions of 2 degrees and more gain over 100 % (docs/registration.md).
HEADER_TRUST_MM = 0.5
HEADER_TRUST_GAIN = 0.02


def to_sitk(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A SimpleITK float32 image in LPS physical space from a NIfTI array + RAS affine.

    ``data`` is indexed ``(i, j, k)`` like nibabel; SimpleITK arrays are
    ``(k, j, i)``, hence the transpose. Origin, spacing and direction
    reproduce ``diag(-1, -1, 1) @ affine`` exactly (the direction keeps any
    shear the affine may have).
    """
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"expected a 3-D array, got shape {data.shape}")
    lps = RAS_TO_LPS @ np.asarray(affine, dtype=float)
    spacing = voxel_sizes(lps)
    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
    img.SetOrigin([float(v) for v in lps[:3, 3]])
    return img


def sitk_affine(img: sitk.Image) -> np.ndarray:
    """RAS voxel-to-world 4x4 affine of a SimpleITK image (inverse of ``to_sitk``'s mapping)."""
    lps = np.eye(4)
    direction = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)
    lps[:3, :3] = direction * np.asarray(img.GetSpacing(), dtype=float)
    lps[:3, 3] = img.GetOrigin()
    return RAS_TO_LPS @ lps


def _itk_to_matrix(tx: sitk.Transform) -> np.ndarray:
    """4x4 (LPS) matrix of an ITK matrix-offset transform (Euler, versor, affine)."""
    tx = tx.Downcast() if hasattr(tx, "Downcast") else tx
    if not all(hasattr(tx, a) for a in ("GetMatrix", "GetTranslation", "GetCenter")):
        raise ValueError(f"not a linear (matrix + offset) ITK transform: {tx.GetName()}")
    m = np.asarray(tx.GetMatrix(), dtype=float).reshape(3, 3)
    c = np.asarray(tx.GetCenter(), dtype=float)
    t = np.asarray(tx.GetTranslation(), dtype=float)
    out = np.eye(4)
    out[:3, :3] = m
    out[:3, 3] = t + c - m @ c  # ITK: y = M (x - c) + c + t
    return out


def _matrix_to_itk_affine(matrix: np.ndarray) -> sitk.AffineTransform:
    tx = sitk.AffineTransform(3)
    tx.SetMatrix([float(v) for v in matrix[:3, :3].ravel()])
    tx.SetTranslation([float(v) for v in matrix[:3, 3]])
    return tx


def _psf_variance(img: sitk.Image) -> np.ndarray:
    """World (LPS) covariance (3, 3) mm^2 of a box point-spread function one voxel wide per axis."""
    direction = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)
    return direction @ np.diag(np.asarray(img.GetSpacing(), dtype=float) ** 2 / 12) @ direction.T


def _match_variance(img: sitk.Image, other: sitk.Image) -> np.ndarray:
    """Per-axis Gaussian variance (mm^2) that gives ``img`` the coarser resolution of ``other``.

    Two thick-slice stacks with different slice directions (axial vs
    sagittal) see every edge with different blur; the MI optimum then shifts
    by a fraction of a millimetre. Blurring each image along the other's
    thick direction gives both the same effective resolution.
    """
    direction = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)
    theirs = np.diag(direction.T @ _psf_variance(other) @ direction)
    ours = np.asarray(img.GetSpacing(), dtype=float) ** 2 / 12
    return np.maximum(theirs - ours, 0.0)


def _smooth(img: sitk.Image, variance: np.ndarray) -> sitk.Image:
    """Gaussian smoothing with a per-axis variance (mm^2), recursive (IIR) filters.

    Recursive filters cost the same whatever the width, unlike a discrete
    kernel; axes whose sigma is under a quarter voxel are left alone.
    """
    spacing = np.asarray(img.GetSpacing(), dtype=float)
    for axis, (var, step) in enumerate(zip(variance, spacing, strict=True)):
        sigma = float(np.sqrt(max(var, 0.0)))
        # ITK's recursive filter needs at least 4 pixels along the axis.
        if sigma >= 0.25 * step and img.GetSize()[axis] >= 4:
            img = sitk.RecursiveGaussian(
                img, sigma, False, sitk.RecursiveGaussianImageFilter.ZeroOrder, axis
            )
    return img


def _resample_to(img: sitk.Image, level_mm: float, interpolator: int) -> sitk.Image:
    """``img`` on a grid of spacing ``max(spacing, level_mm)``, same direction and centre."""
    spacing = np.asarray(img.GetSpacing(), dtype=float)
    new_spacing = np.maximum(spacing, level_mm)
    if np.allclose(new_spacing, spacing):
        return img
    size = np.asarray(img.GetSize(), dtype=float)
    new_size = np.maximum(np.round(size * spacing / new_spacing), 1).astype(int)
    direction = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)
    shift = (size - 1) * spacing / 2 - (new_size - 1) * new_spacing / 2
    origin = np.asarray(img.GetOrigin(), dtype=float) + direction @ shift
    return sitk.Resample(
        img,
        [int(n) for n in new_size],
        sitk.Transform(),
        interpolator,
        [float(v) for v in origin],
        [float(s) for s in new_spacing],
        img.GetDirection(),
        0.0,
        img.GetPixelID(),
    )


def _pyramid(
    img: sitk.Image, levels_mm: Sequence[float], extra_variance: np.ndarray
) -> dict[float, sitk.Image]:
    """Smoothed, resampled copies of ``img`` for each level (mm), built fine to coarse.

    Level ``L`` has spacing ``max(spacing, L)`` per axis and carries a Gaussian
    of variance ``(max(spacing, L)^2 - spacing^2) / 4 + extra_variance``:
    anti-aliasing only along axes that are actually resampled (a 4 mm slice
    axis stays untouched at a 2 mm level). Each coarser level is smoothed from
    the previous one by the variance still missing, which keeps large volumes
    fast.
    """
    spacing = np.asarray(img.GetSpacing(), dtype=float)
    out: dict[float, sitk.Image] = {}
    done = np.zeros(3)
    current = img
    for level in sorted(set(float(v) for v in levels_mm)):
        target = (
            0.25 * np.maximum(np.maximum(spacing, level) ** 2 - spacing**2, 0.0) + extra_variance
        )
        current = _resample_to(_smooth(current, target - done), level, sitk.sitkLinear)
        done = np.maximum(target, done)
        out[level] = current
    return out


def _level_mask(mask: sitk.Image, level_mm: float, margin_mm: float) -> sitk.Image:
    """A mask on the pyramid level's grid, dilated by ``margin_mm`` (per-axis radius in voxels)."""
    out = _resample_to(mask, level_mm, sitk.sitkNearestNeighbor)
    radius = [int(np.floor(margin_mm / s + 0.5)) for s in out.GetSpacing()]
    if max(radius) > 0:
        out = sitk.BinaryDilate(out, radius, sitk.sitkBall, 0.0, 1.0)
    return out


def _mask_image(
    mask: np.ndarray | None, affine: np.ndarray, shape: Sequence[int]
) -> sitk.Image | None:
    if mask is None:
        return None
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != tuple(shape[:3]):
        raise ValueError(f"mask shape {mask.shape} does not match its image {tuple(shape[:3])}")
    if not mask.any():
        raise ValueError("registration mask is empty")
    return sitk.Cast(to_sitk(mask.astype(np.float32), affine), sitk.sitkUInt8)


def _centre_lps(img: sitk.Image, mask: sitk.Image | None) -> np.ndarray:
    """Physical (LPS) centroid of the mask, or of the image's field of view."""
    if mask is not None:
        arr = sitk.GetArrayViewFromImage(mask)
        idx = np.argwhere(arr > 0).mean(axis=0)[::-1]  # (k, j, i) -> (i, j, k)
    else:
        idx = (np.asarray(img.GetSize(), dtype=float) - 1) / 2
    return np.asarray(img.TransformContinuousIndexToPhysicalPoint([float(v) for v in idx]))


def _foreground_points(img: sitk.Image, mask: sitk.Image | None, step: int = 3) -> np.ndarray:
    """Physical (LPS) points ``(N, 3)`` of every ``step``-th mask voxel per axis (or the FOV)."""
    if mask is None:
        idx = np.argwhere(np.ones(img.GetSize()[::-1], bool)[::step, ::step, ::step]) * step
    else:
        arr = sitk.GetArrayViewFromImage(mask)[::step, ::step, ::step]
        idx = np.argwhere(arr > 0) * step
    ijk = idx[:, ::-1].astype(float)  # (k, j, i) -> (i, j, k)
    direction = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)
    scale = direction * np.asarray(img.GetSpacing(), dtype=float)
    return ijk @ scale.T + np.asarray(img.GetOrigin(), dtype=float)


def mean_displacement(a: np.ndarray, b: np.ndarray, points: np.ndarray) -> float:
    """Mean distance (mm) between where two 4x4 transforms put ``points`` ``(N, 3)``."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return float(np.linalg.norm(points @ d[:3, :3].T + d[:3, 3], axis=1).mean())


def _full_metric(
    fixed: sitk.Image,
    moving: sitk.Image,
    transform: sitk.Transform,
    bins: int,
    threads: int,
    *,
    fixed_mask: sitk.Image | None,
    moving_mask: sitk.Image | None,
) -> float:
    """Mattes MI of ``transform`` over every (masked) fixed voxel: deterministic, noise-free."""
    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(int(threads))
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(bins))
    method.SetMetricSamplingStrategy(method.NONE)
    if fixed_mask is not None:
        method.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        method.SetMetricMovingMask(moving_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetInitialTransform(transform, inPlace=False)
    return float(method.MetricEvaluate(fixed, moving))


def _optimise(
    fixed: sitk.Image,
    moving: sitk.Image,
    transform: sitk.Euler3DTransform,
    level_mm: float,
    *,
    fixed_mask: sitk.Image | None,
    moving_mask: sitk.Image | None,
    samples: int,
    seed: int,
    bins: int,
    iterations: int,
    threads: int,
) -> int:
    """One pyramid level of MI optimisation, updating ``transform`` in place; returns iterations."""
    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(int(threads))
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(bins))
    n_fixed = int(np.prod(fixed.GetSize()))
    if fixed_mask is not None:
        n_fixed = max(int(sitk.GetArrayViewFromImage(fixed_mask).sum()), 1)
        method.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        method.SetMetricMovingMask(moving_mask)
    method.SetMetricSamplingStrategy(method.RANDOM)
    # SimpleITK reads seed 0 as "seed from the wall clock": shift by one.
    method.SetMetricSamplingPercentage(min(1.0, samples / n_fixed), int(seed) % 2**31 + 1)
    method.SetInterpolator(sitk.sitkLinear)
    # Steps in mm of maximal voxel shift (physical-shift scales), so the
    # same schedule suits rotations and translations at every level.
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=level_mm / 2,
        minStep=level_mm * MIN_STEP,
        numberOfIterations=int(iterations),
        relaxationFactor=RELAXATION,
        gradientMagnitudeTolerance=1e-8,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)
    logger.debug(
        "level %.1f mm: %d iterations, MI %.4f (%s)",
        level_mm,
        method.GetOptimizerIteration(),
        method.GetMetricValue(),
        method.GetOptimizerStopConditionDescription(),
    )
    return int(method.GetOptimizerIteration())


def register_rigid(
    fixed_data: np.ndarray,
    fixed_affine: np.ndarray,
    moving_data: np.ndarray,
    moving_affine: np.ndarray,
    *,
    fixed_mask: np.ndarray | None = None,
    moving_mask: np.ndarray | None = None,
    seed: int = 0,
    initial: np.ndarray | None = None,
    levels_mm: Sequence[float] = LEVELS_MM,
    samples: int = SAMPLES,
    bins: int = BINS,
    iterations: int = ITERATIONS,
    threads: int = 2,
    min_motion_mm: float = 0.0,
    min_gain: float = 0.0,
    report: dict | None = None,
) -> np.ndarray:
    """Rigid (6 dof) transform aligning a moving image to a fixed image.

    Mattes mutual information (``bins`` histogram bins, ``samples`` random
    samples drawn inside ``fixed_mask`` with ``seed``), linear interpolation,
    regular-step gradient descent with parameter scales from physical shift,
    over a coarse-to-fine pyramid ``levels_mm``. The rotation centre is the
    fixed foreground's centroid. Headers are trusted as the starting point
    (``initial`` or identity): scans of one session share the scanner frame.

    Parameters
    ----------
    fixed_data, fixed_affine
        Reference image ``(X, Y, Z)`` and its 4x4 RAS voxel-to-world affine.
    moving_data, moving_affine
        Image to align, on its own grid (any orientation and voxel size).
    fixed_mask, moving_mask
        Optional bool foregrounds on the respective grids; metric samples are
        taken where both hold.
    seed
        Seed of the metric's random sampling.
    initial
        Optional 4x4 starting transform (moving world -> fixed world).
    threads
        ITK threads; fixed so that results do not depend on the machine.
    min_motion_mm, min_gain
        Keep the start unless the best pose moves the fixed foreground (or
        field of view) by at least ``min_motion_mm``, mean over its voxels
        (mm), and improves the finest level's MI by at least the fraction
        ``min_gain`` of the start's. The workflow passes
        :data:`HEADER_TRUST_MM` and :data:`HEADER_TRUST_GAIN`.
    report
        If a dict is given, it receives ``metric`` (final Mattes MI over all
        masked voxels of the finest level, negative: lower is better),
        ``metric_initial`` (same, at the starting transform), ``found_mm``
        (mean foreground displacement of the best pose from the start),
        ``gain`` (its relative MI improvement), ``kept_start`` (True when
        the start is returned: its MI was not beaten, or one of the two
        thresholds was not reached), ``iterations`` per level and ``seconds``.

    Returns
    -------
    (4, 4) float64 rigid matrix mapping moving-world points (RAS mm) to
    fixed-world points; the moving image's effective affine is
    ``transform @ moving_affine``.
    """
    start = time.perf_counter()
    fixed = to_sitk(fixed_data, fixed_affine)
    moving = to_sitk(moving_data, moving_affine)
    fmask = _mask_image(fixed_mask, fixed_affine, np.shape(fixed_data))
    mmask = _mask_image(moving_mask, moving_affine, np.shape(moving_data))

    tx = sitk.Euler3DTransform()
    tx.SetCenter([float(v) for v in _centre_lps(fixed, fmask)])
    if initial is not None:
        # ITK parameters describe fixed -> moving in LPS: the inverse, flipped.
        start_lps = RAS_TO_LPS @ np.linalg.inv(np.asarray(initial, dtype=float)) @ RAS_TO_LPS
        c = np.asarray(tx.GetCenter())
        tx.SetMatrix([float(v) for v in start_lps[:3, :3].ravel()])
        tx.SetTranslation([float(v) for v in start_lps[:3, 3] + start_lps[:3, :3] @ c - c])

    # Small fields of view (phantoms, partial coverage) skip the levels that
    # would leave fewer than ~8 voxels across the narrowest extent.
    extent = min(
        float((np.asarray(img.GetSize()) * np.asarray(img.GetSpacing())).min())
        for img in (fixed, moving)
    )
    levels_mm = [lv for lv in levels_mm if lv <= extent / 8] or [min(levels_mm)]
    fixed_levels = _pyramid(fixed, levels_mm, _match_variance(fixed, moving))
    moving_levels = _pyramid(moving, levels_mm, _match_variance(moving, fixed))
    start_tx = sitk.Euler3DTransform(tx)
    settings = {"samples": samples, "seed": seed, "bins": bins, "iterations": iterations}
    settings["threads"] = threads
    masks: dict = {}
    iterations_run = []
    for level_mm in levels_mm:
        f, m = fixed_levels[float(level_mm)], moving_levels[float(level_mm)]
        fm = None if fmask is None else _level_mask(fmask, level_mm, MASK_MARGIN_MM)
        mm = None if mmask is None else _level_mask(mmask, level_mm, MASK_MARGIN_MM)
        masks = {"fixed_mask": fm, "moving_mask": mm}
        iterations_run.append(_optimise(f, m, tx, level_mm, **settings, **masks))
    # Judge on every masked voxel of the finest level (no sampling noise).
    # Scans of one session are often aligned already; the coarse levels, with
    # their different blur per contrast, can pull a well-aligned pair off, so
    # the finest level is also run from the start and the best of start,
    # pyramid result and start-refined result is kept: the returned transform
    # is never worse, by the metric itself, than the headers.
    refined_start = sitk.Euler3DTransform(start_tx)
    _optimise(f, m, refined_start, levels_mm[-1], **settings, **masks)
    candidates = [start_tx, refined_start, tx]
    values = [_full_metric(f, m, t, bins, threads, **masks) for t in candidates]
    metric_initial = values[0]
    best = int(np.argmin(values[::-1]))  # ties: prefer the pyramid result
    tx, metric_final = candidates[::-1][best], values[::-1][best]
    logger.debug("finest-level MI: start %.4f, refined start %.4f, pyramid %.4f", *values)
    found_mm = mean_displacement(
        _itk_to_matrix(tx), _itk_to_matrix(start_tx), _foreground_points(fixed, fmask)
    )
    gain = (metric_initial - metric_final) / max(abs(metric_initial), 1e-12)
    if found_mm < min_motion_mm or gain < min_gain:
        tx, metric_final = start_tx, metric_initial
    itk_lps = _itk_to_matrix(tx)  # fixed LPS -> moving LPS
    transform = np.linalg.inv(RAS_TO_LPS @ itk_lps @ RAS_TO_LPS)
    if report is not None:
        report.update(
            metric=metric_final,
            metric_initial=metric_initial,
            found_mm=found_mm,
            gain=gain,
            kept_start=tx is start_tx,
            iterations=iterations_run,
            seconds=time.perf_counter() - start,
        )
    return transform


def transform_summary(matrix: np.ndarray, centre: Sequence[float] | None = None) -> dict:
    """Human-readable size of a rigid 4x4 world transform, for sidecars and logs.

    Returns ``RotationDeg`` (axis-angle magnitude, degrees), ``RotationAxis``
    (unit RAS vector; ``[0, 0, 1]`` when there is no rotation),
    ``TranslationMm`` (the matrix's translation column, RAS mm: the displacement
    of the world origin), ``DisplacementMm`` (norm of the displacement of
    ``centre``, default the world origin) and ``Matrix`` (4x4 nested list).
    """
    m = np.asarray(matrix, dtype=float)
    rot = m[:3, :3]
    cos = np.clip((np.trace(rot) - 1) / 2, -1.0, 1.0)
    angle = float(np.degrees(np.arccos(cos)))
    axis = np.array([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]])
    norm = np.linalg.norm(axis)
    if norm > 1e-12:
        axis = axis / norm
    elif angle > 90:  # 180 degrees: axis from the symmetric part
        w, v = np.linalg.eigh((rot + rot.T) / 2)
        axis = v[:, int(np.argmax(w))]
    else:
        axis = np.array([0.0, 0.0, 1.0])
    c = np.zeros(3) if centre is None else np.asarray(centre, dtype=float)
    displacement = float(np.linalg.norm(rot @ c + m[:3, 3] - c))
    return {
        "RotationDeg": round(angle, 4),
        "RotationAxis": [round(float(v), 6) for v in axis],
        "TranslationMm": [round(float(v), 4) for v in m[:3, 3]],
        "DisplacementMm": round(displacement, 4),
        "Matrix": [[float(v) for v in row] for row in m],
    }


def save_transform(path: str | Path, matrix: np.ndarray) -> Path:
    """Write a 4x4 RAS world transform (moving/source world -> reference world) as ITK text.

    The file holds ``diag(-1,-1,1) @ inv(matrix) @ diag(-1,-1,1)`` as an
    ``AffineTransform_double_3_3``: the reference-to-source LPS mapping that
    ITK/ANTs use to resample the source image onto the reference, matching the
    BIDS name ``..._from-<source>_to-<reference>_mode-image_xfm.txt``. Returns
    the path.
    """
    path = Path(path)
    itk = RAS_TO_LPS @ np.linalg.inv(np.asarray(matrix, dtype=float)) @ RAS_TO_LPS
    # Written beside the target then renamed, so a file that exists is complete.
    tmp = path.with_name(f".{path.name}.tmp.txt")
    sitk.WriteTransform(_matrix_to_itk_affine(itk), str(tmp))
    os.replace(tmp, path)
    return path


def load_transform(path: str | Path) -> np.ndarray:
    """Read a transform file written by ``save_transform`` (or any linear ITK transform).

    Returns the 4x4 RAS matrix mapping source world -> reference world.
    """
    path = Path(path)
    try:
        tx = sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        raise ValueError(f"{path}: not a readable ITK transform file") from exc
    if tx.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(tx)
        if composite.GetNumberOfTransforms() != 1:
            raise ValueError(
                f"{path}: holds {composite.GetNumberOfTransforms()} transforms, expected 1"
            )
        tx = composite.GetNthTransform(0)
    params, fixed = tx.GetParameters(), tx.GetFixedParameters()
    if tx.GetName() == "CompositeTransform" and len(params) == 12 and len(fixed) == 3:
        # A MatrixOffsetTransformBase (e.g. a publisher's affine), which SimpleITK
        # wraps rather than names: its parameters are an affine's.
        tx = sitk.AffineTransform(3)
        tx.SetFixedParameters(fixed)
        tx.SetParameters(params)
    itk = _itk_to_matrix(tx)
    return np.linalg.inv(RAS_TO_LPS @ itk @ RAS_TO_LPS)
