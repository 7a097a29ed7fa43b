"""Optional output in a template space (``--output-space MNI152NLin2009cAsym``).

The reference contrast is aligned *rigidly* (6 dof, Mattes MI, see
``registration.register_rigid``) to a T1w template; the super-resolved volumes
are then written on an isotropic grid covering the template's field of view.
Rigid means the brain keeps its own size and shape: the output is in template
*coordinates* (origin, orientation), not spatially normalised.

Where the template comes from, never touching the network:

1. TemplateFlow, only when the file is already on disk in
   ``$TEMPLATEFLOW_HOME`` (default ``~/.cache/templateflow``), read directly
   from ``tpl-<name>/tpl-<name>_res-01[_desc-brain]_T1w.nii.gz``. TemplateFlow's
   client is not called: a fresh TemplateFlow home holds 0-byte placeholders
   that its client would try to download; those are treated as absent.
2. Otherwise nilearn's packaged MNI152 (ICBM 2009a nonlinear *symmetric*,
   skull-stripped, 1 mm; shipped inside the nilearn wheel). It shares the MNI
   coordinate frame with MNI152NLin2009cAsym and differs from it by far less
   than rigid alignment can resolve, so it serves as the offline fallback for
   that space; ``TemplateSpace.source`` records which file was used.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .geometry import output_grid
from .masks import foreground_mask
from .registration import register_rigid

logger = logging.getLogger(__name__)

#: Template spaces that ``--output-space`` accepts (besides ``native``).
SUPPORTED = ("MNI152NLin2009cAsym",)
#: Spaces the nilearn fallback may stand in for.
_NILEARN_FALLBACK = {"MNI152NLin2009cAsym"}
NILEARN_SOURCE = "nilearn:mni_icbm152_t1_tal_nlin_sym_09a (skull-stripped)"

#: Coarse search (mm, along the template's superior axis) over starting
#: positions: a head with neck and a brain-only template have centroids that
#: differ by centimetres in z, more than MI's capture range at 8 mm.
_Z_STARTS_MM = (0.0, -20.0, 20.0, -40.0)


@dataclass(frozen=True)
class Template:
    """A template image: ``data`` (X, Y, Z) with its RAS affine (4, 4)."""

    name: str
    data: np.ndarray
    affine: np.ndarray
    skull_stripped: bool
    source: str  # file path, or NILEARN_SOURCE


@dataclass(frozen=True)
class TemplateSpace:
    """Where and how to write outputs in a template space.

    ``transform`` (4, 4) maps reference-world points (RAS mm) to template-world
    points; an input's affine in template space is
    ``transform @ registration_transform @ affine``. ``shape``/``affine`` are
    the isotropic output grid on the template's field of view.
    """

    name: str
    transform: np.ndarray
    shape: tuple[int, int, int]
    affine: np.ndarray
    source: str

    @property
    def spatial_reference(self) -> str:
        """Value for the sidecar's ``SpatialReference``: a TemplateFlow URI or the packaged file."""
        if self.source == NILEARN_SOURCE:
            return f"{self.name} (approximated by {NILEARN_SOURCE})"
        return f"https://templateflow.s3.amazonaws.com/tpl-{self.name}/{Path(self.source).name}"


def templateflow_home() -> Path:
    """TemplateFlow's local directory: ``$TEMPLATEFLOW_HOME`` or ``~/.cache/templateflow``."""
    env = os.environ.get("TEMPLATEFLOW_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "templateflow"


def local_templateflow_file(name: str, skull_stripped: bool) -> Path | None:
    """The 1 mm T1w template file of ``name`` if it is really on disk (size > 0), else None."""
    desc = "_desc-brain" if skull_stripped else ""
    path = templateflow_home() / f"tpl-{name}" / f"tpl-{name}_res-01{desc}_T1w.nii.gz"
    try:
        return path if path.is_file() and path.stat().st_size > 0 else None
    except OSError:
        return None


def load_template(name: str = "MNI152NLin2009cAsym", *, skull_stripped: bool = False) -> Template:
    """The T1w template ``name`` from local TemplateFlow files or nilearn's packaged MNI152.

    ``skull_stripped`` selects TemplateFlow's brain-extracted variant (use it
    when the reference is skull-stripped); the nilearn fallback is always
    skull-stripped. Never downloads anything.

    Raises
    ------
    ValueError
        Unknown space, or no local copy and no offline fallback for it.
    """
    if name not in SUPPORTED:
        raise ValueError(
            f"--output-space {name}: unsupported; choose native or one of {', '.join(SUPPORTED)}"
        )
    for stripped in (skull_stripped, not skull_stripped):
        path = local_templateflow_file(name, stripped)
        if path is None:
            continue
        try:
            img = nib.load(str(path))
            data = np.asarray(img.get_fdata(dtype=np.float32))
        except Exception as exc:  # a truncated or corrupt download: fall through
            logger.warning("ignoring unreadable TemplateFlow file %s (%s)", path, exc)
            continue
        return Template(name, data, img.affine, stripped, str(path))
    if name not in _NILEARN_FALLBACK:
        raise ValueError(
            f"--output-space {name}: template not found in {templateflow_home()}; "
            "pre-fetch it with TemplateFlow (TEMPLATEFLOW_HOME)"
        )
    from nilearn.datasets import load_mni152_template  # packaged file, no download

    img = load_mni152_template(resolution=1)
    logger.info("%s not in %s: using %s", name, templateflow_home(), NILEARN_SOURCE)
    return Template(
        name, np.asarray(img.get_fdata(dtype=np.float32)), img.affine, True, NILEARN_SOURCE
    )


def _centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return affine[:3, :3] @ np.argwhere(mask).mean(axis=0) + affine[:3, 3]


def align_to_template(
    ref_data: np.ndarray,
    ref_affine: np.ndarray,
    template: Template,
    *,
    ref_mask: np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Rigid transform (4, 4) from the reference world to the template world (RAS mm).

    Starts from the translation that superimposes the foreground centroids,
    tries a few superior-inferior offsets at the coarsest level and refines
    the best one (fixed image: the template, sampled inside its foreground).
    """
    if ref_mask is None:
        ref_mask = foreground_mask(ref_data, ref_affine)
    tpl_mask = foreground_mask(template.data, template.affine)
    shift = _centroid(tpl_mask, template.affine) - _centroid(ref_mask, ref_affine)
    register = functools.partial(
        register_rigid,
        template.data,
        template.affine,
        ref_data,
        ref_affine,
        fixed_mask=tpl_mask,
        moving_mask=ref_mask,
        seed=seed,
    )
    best, best_metric = None, np.inf
    for dz in _Z_STARTS_MM:
        start = np.eye(4)
        start[:3, 3] = shift + np.array([0.0, 0.0, dz])
        report: dict = {}
        coarse = register(initial=start, levels_mm=(8.0,), report=report)
        if report["metric"] < best_metric:
            best, best_metric = coarse, report["metric"]
    return register(initial=best, levels_mm=(4.0, 2.0))


def template_space(
    ref_data: np.ndarray,
    ref_affine: np.ndarray,
    name: str,
    resolution: float,
    *,
    ref_mask: np.ndarray | None = None,
    skull_stripped: bool = False,
    seed: int = 0,
) -> TemplateSpace:
    """Everything needed to write outputs in template space ``name``.

    Parameters
    ----------
    ref_data, ref_affine
        The reference contrast (the first input) and its affine.
    resolution
        Output voxel size (mm, isotropic).
    ref_mask
        Its foreground (default: computed).
    skull_stripped
        Whether the reference is skull-stripped (picks the matching template).
    """
    template = load_template(name, skull_stripped=skull_stripped)
    transform = align_to_template(ref_data, ref_affine, template, ref_mask=ref_mask, seed=seed)
    shape, affine = output_grid([(template.data.shape, template.affine)], resolution)
    return TemplateSpace(name, transform, shape, affine, template.source)
