"""Report figures (matplotlib, headless) returned as base64 PNG data URIs.

Every figure is drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas,
so nothing here touches pyplot's global state or needs a display.

Display conventions: volumes are shown in the closest RAS+ orientation of the
output grid, *neurological* convention (subject's left on the image's left),
axial seen from above, coronal from the front, sagittal from the subject's left
(anterior to the right). Input and output of a contrast share one intensity
window: the input's robust range (``qc.ROBUST_PERCENTILES``) inside its
foreground, so brightness differences are real.
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
from collections.abc import Mapping, Sequence

import nibabel as nib
import numpy as np


def _ensure_mplconfig() -> None:
    # Containers often run as an arbitrary uid with a read-only HOME; matplotlib
    # then warns and rebuilds its font cache on every run. Point it at /tmp.
    if os.environ.get("MPLCONFIGDIR"):
        return
    home = os.path.expanduser("~")
    if not os.access(home, os.W_OK):
        os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="mcsr-mpl-")


_ensure_mplconfig()

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ..geometry import rotation_of  # noqa: E402
from ..resample import sample_world  # noqa: E402

#: Resolution of the embedded PNGs: sharp on a laptop screen, small HTML.
DPI = 90
#: Slices per view in the mosaics.
N_SLICES = 6
#: View name -> RAS axis perpendicular to it.
VIEWS = {"sagittal": 0, "coronal": 1, "axial": 2}
_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("I", "S"))


def data_uri(fig: Figure) -> str:
    """Render a figure to a ``data:image/png;base64,...`` URI (and release it)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Volume and affine reoriented to the closest RAS+ voxel order (no resampling)."""
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data), np.asarray(affine, float)))
    return np.asarray(img.dataobj), img.affine


def plane_world(shape: Sequence[int], affine: np.ndarray, axis: int, index: int) -> np.ndarray:
    """World coordinates ``(n_u * n_v, 3)`` of the voxel centres of one grid plane.

    The plane is ``index`` along voxel ``axis``; the two remaining axes ``u < v``
    vary in C order, so the samples reshape to ``(shape[u], shape[v])``.
    """
    u, v = (a for a in range(3) if a != axis)
    iu, iv = np.meshgrid(np.arange(shape[u]), np.arange(shape[v]), indexing="ij")
    ijk = np.zeros((iu.size, 3))
    ijk[:, axis] = index
    ijk[:, u] = iu.ravel()
    ijk[:, v] = iv.ravel()
    a = np.asarray(affine, dtype=float)
    return ijk @ a[:3, :3].T + a[:3, 3]


def sample_plane(
    data: np.ndarray,
    affine: np.ndarray,
    grid_shape: Sequence[int],
    grid_affine: np.ndarray,
    axis: int,
    index: int,
    order: int = 1,
) -> np.ndarray:
    """An input volume sampled on one plane of another grid (2-D float, NaN outside its FOV).

    ``order`` 0 shows the voxels as acquired (thick slices stay blocks), 1 is
    what a viewer's linear interpolation shows.
    """
    u, v = (a for a in range(3) if a != axis)
    world = plane_world(grid_shape, grid_affine, axis, index)
    values = sample_world(np.asarray(data, dtype=np.float64), affine, world, order, np.nan)
    return values.reshape(grid_shape[u], grid_shape[v])


def pick_slices(mask: np.ndarray, axis: int, n: int = N_SLICES) -> list[int]:
    """``n`` slice indices along ``axis`` spread over the central 70% of the mask's extent."""
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(np.asarray(mask).any(axis=other))
    lo, hi = (present[0], present[-1]) if present.size else (0, mask.shape[axis] - 1)
    span = hi - lo
    picks = np.round(lo + span * np.linspace(0.15, 0.85, n)).astype(int)
    return [int(i) for i in picks]


def _show(ax, plane: np.ndarray, vmin: float, vmax: float, cmap: str = "gray", aspect=1.0):
    # Planes are (u, v) with u, v increasing R/A/S; transpose + origin lower puts
    # u horizontally (left -> right) and v vertically (bottom -> top).
    im = ax.imshow(
        np.ma.masked_invalid(plane).T,
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        origin="lower",
        interpolation="nearest",
        aspect=aspect,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    return im


def _orientation_labels(ax, axis: int) -> None:
    u, v = (a for a in range(3) if a != axis)
    style = {"color": "#ffd54f", "fontsize": 7, "transform": ax.transAxes}
    ax.text(0.02, 0.5, _AXIS_LETTERS[u][0], va="center", ha="left", **style)
    ax.text(0.98, 0.5, _AXIS_LETTERS[u][1], va="center", ha="right", **style)
    ax.text(0.5, 0.98, _AXIS_LETTERS[v][1], va="top", ha="center", **style)


def mosaic_figure(
    input_data: np.ndarray,
    input_affine: np.ndarray,
    output_ras: np.ndarray,
    output_ras_affine: np.ndarray,
    view: str,
    window: tuple[float, float],
    mask: np.ndarray,
    title: str,
) -> str:
    """Input (linear, on the output grid) above output for ``N_SLICES`` slices of one view.

    ``output_ras``/``output_ras_affine`` come from :func:`canonical`;
    ``input_affine`` is the input's effective affine in the output world;
    ``mask`` (output RAS shape) chooses the slice range.
    """
    axis = VIEWS[view]
    slices = pick_slices(mask, axis)
    u, v = (a for a in range(3) if a != axis)
    w, h = output_ras.shape[u], output_ras.shape[v]
    panel_w = 1.55
    height = 2 * panel_w * h / w + 0.55  # 0.55 in: suptitle + slice titles
    fig = Figure(figsize=(panel_w * len(slices) + 0.7, height))
    axes = fig.subplots(2, len(slices), squeeze=False)
    fig.subplots_adjust(
        left=0.06, right=0.995, top=1 - 0.5 / height, bottom=0.01, wspace=0.02, hspace=0.03
    )
    for col, k in enumerate(slices):
        inp = sample_plane(input_data, input_affine, output_ras.shape, output_ras_affine, axis, k)
        out = np.take(output_ras, k, axis=axis)
        _show(axes[0, col], inp, *window)
        _show(axes[1, col], out, *window)
        coord = (output_ras_affine[:3, :3] @ np.eye(3)[axis] * k + output_ras_affine[:3, 3])[axis]
        axes[0, col].set_title(f"{'xyz'[axis]} = {coord:.0f} mm", fontsize=8)
        for ax in axes[:, col]:
            ax.set_facecolor("black")
            _orientation_labels(ax, axis)
    axes[0, 0].set_ylabel("input", fontsize=9)
    axes[1, 0].set_ylabel("output", fontsize=9)
    fig.suptitle(title, fontsize=10, x=0.06, y=1 - 0.04 / height, ha="left", va="top")
    return data_uri(fig)


def zoom_figure(
    input_data: np.ndarray,
    input_affine: np.ndarray,
    output_ras: np.ndarray,
    output_ras_affine: np.ndarray,
    window: tuple[float, float],
    mask: np.ndarray,
    title: str,
) -> str:
    """Through-plane zoom: a central crop of a plane that contains the input's slice direction.

    Three panels on the same crop: the input as acquired (nearest neighbour, the
    thick slices visible as blocks), the input linearly interpolated (what plain
    upsampling gives) and the output.
    """
    direction = np.asarray(input_affine, float)[:3, :3]
    slice_dir = direction[:, int(np.argmax(np.linalg.norm(direction, axis=0)))]
    through = int(np.argmax(np.abs(rotation_of(output_ras_affine).T @ slice_dir)))
    # Coronal contains both the L-R and I-S directions; for a coronal
    # through-plane direction, sagittal contains A-P.
    axis = 1 if through != 1 else 0
    u, v = (a for a in range(3) if a != axis)
    present = np.argwhere(mask) if mask.any() else np.argwhere(np.ones_like(mask))
    centre = ((present.min(axis=0) + present.max(axis=0)) // 2).astype(int)
    k = int(centre[axis])
    spacing = float(np.linalg.norm(output_ras_affine[:3, 0]))
    half = int(round(32 / spacing))  # 64 mm crop: several thick slices, fine detail visible
    crop = tuple(
        slice(max(0, int(centre[a]) - half), min(output_ras.shape[a], int(centre[a]) + half))
        for a in (u, v)
    )
    planes = [
        sample_plane(input_data, input_affine, output_ras.shape, output_ras_affine, axis, k, 0),
        sample_plane(input_data, input_affine, output_ras.shape, output_ras_affine, axis, k, 1),
        np.take(output_ras, k, axis=axis),
    ]
    labels = ["input as acquired", "input, linear interpolation", "output"]
    fig = Figure(figsize=(9.0, 3.4))
    axes = fig.subplots(1, 3)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.84, bottom=0.02, wspace=0.04)
    for ax, plane, label in zip(axes, planes, labels, strict=True):
        _show(ax, plane[crop], *window)
        ax.set_title(label, fontsize=9)
        ax.set_facecolor("black")
        _orientation_labels(ax, axis)
    view = next(name for name, a in VIEWS.items() if a == axis)
    fig.suptitle(f"{title} - {view} zoom, {2 * half * spacing:.0f} mm field", fontsize=10)
    return data_uri(fig)


def residual_figure(
    residual: np.ndarray,
    compared: np.ndarray,
    input_affine: np.ndarray,
    intensity_range: tuple[float, float],
    title: str,
) -> str:
    """Re-acquisition residual (re-acquired output - input) on the input's own slices.

    Shown in percent of the input's robust intensity range with a symmetric
    diverging colour scale; voxels outside the compared foreground are grey.
    ``input_affine`` is the input's effective affine (used for orientation only).
    """
    scale = max(intensity_range[1] - intensity_range[0], np.finfo(np.float32).eps)
    percent = np.where(compared, 100.0 * residual / scale, np.nan)
    ras, ras_affine = canonical(percent, input_affine)
    mask_ras, _ = canonical(compared.astype(np.uint8), input_affine)
    spacing = np.linalg.norm(ras_affine[:3, :3], axis=0)
    axis = int(np.argmax(spacing))
    u, v = (a for a in range(3) if a != axis)
    values = ras[np.isfinite(ras)]
    limit = float(np.percentile(np.abs(values), 99)) if values.size else 1.0
    limit = max(limit, 1e-3)
    slices = pick_slices(mask_ras.astype(bool), axis)
    h_over_w = ras.shape[v] * spacing[v] / (ras.shape[u] * spacing[u])
    panel_w = 1.55
    height = panel_w * h_over_w + 0.6
    fig = Figure(figsize=(panel_w * len(slices) + 1.1, height))
    axes = fig.subplots(1, len(slices), squeeze=False)[0]
    fig.subplots_adjust(left=0.01, right=0.9, top=1 - 0.5 / height, bottom=0.02, wspace=0.03)
    im = None
    for ax, k in zip(axes, slices, strict=True):
        ax.set_facecolor("#bdbdbd")
        im = _show(
            ax, np.take(ras, k, axis=axis), -limit, limit, "RdBu_r", aspect=spacing[v] / spacing[u]
        )
        ax.set_title(f"input slice {k}", fontsize=8)
        _orientation_labels(ax, axis)
    cax = fig.add_axes((0.915, 0.08, 0.015, 0.7))
    bar = fig.colorbar(im, cax=cax)
    bar.set_label("% of range", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10, x=0.01, y=1 - 0.04 / height, ha="left", va="top")
    return data_uri(fig)


def curves_figure(
    mi_curve: Mapping[str, Sequence[float]],
    loss_curve: Mapping[str, Sequence[float]],
    selected_epoch: int | None,
    stop_reason: str | None,
) -> str:
    """MI between predicted contrasts and training loss per contrast, per epoch (1-based).

    The selected epoch (whose model wrote the outputs) is a dashed line; the
    stop reason is in the title.
    """
    fig = Figure(figsize=(9.0, 3.2))
    ax_mi, ax_loss = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.07, right=0.99, top=0.8, bottom=0.16, wspace=0.25)
    for ax, curves, ylabel in (
        (ax_mi, mi_curve, "mutual information (nats)"),
        (ax_loss, loss_curve, "training loss (MSE, normalised)"),
    ):
        for name, values in curves.items():
            values = np.asarray(values, dtype=float)
            ax.plot(np.arange(1, values.size + 1), values, marker=".", ms=3, lw=1.2, label=name)
        if selected_epoch:
            ax.axvline(selected_epoch, color="#c62828", ls="--", lw=1)
        ax.set_xlabel("epoch", fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(fontsize=7, frameon=False)
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
    if loss_curve and all(min(v, default=1.0) > 0 for v in loss_curve.values()):
        ax_loss.set_yscale("log")
    fig.suptitle(
        f"selected epoch: {selected_epoch if selected_epoch else 'n/a'} (dashed)   "
        f"stop reason: {stop_reason or 'n/a'}",
        fontsize=10,
    )
    return data_uri(fig)


def group_figure(
    metrics: Mapping[str, str],
    rows: Sequence[Mapping[str, object]],
    group_key: str,
    flags: Mapping[str, Sequence[bool]],
) -> str:
    """One strip plot per metric (column -> axis label), points grouped by ``group_key``.

    Flagged outliers (``flags[column][row]``) are red and labelled with the
    participant; values that are missing or not numbers are left out.
    """
    groups = sorted({str(r.get(group_key, "")) for r in rows})
    fig = Figure(figsize=(2.6 * max(1, len(metrics)), 3.0))
    axes = fig.subplots(1, max(1, len(metrics)), squeeze=False)[0]
    fig.subplots_adjust(left=0.07, right=0.99, top=0.9, bottom=0.2, wspace=0.45)
    rng = np.random.default_rng(0)  # fixed jitter: the same report twice is identical
    for ax, (column, label) in zip(axes, metrics.items(), strict=False):
        for x, group in enumerate(groups):
            for i, row in enumerate(rows):
                if str(row.get(group_key, "")) != group:
                    continue
                value = to_number(row.get(column))
                if value is None:
                    continue
                bad = bool(flags.get(column, [False] * len(rows))[i])
                xj = x + rng.uniform(-0.15, 0.15)
                ax.plot(xj, value, "o", ms=5, color="#c62828" if bad else "#1565c0", alpha=0.8)
                if bad:
                    ax.annotate(str(row.get("participant_id", "")), (xj, value), fontsize=6)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, fontsize=8, rotation=30)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    return data_uri(fig)


def to_number(value: object) -> float | None:
    """A finite float from a TSV cell (str or number), else None."""
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return x if np.isfinite(x) else None
