"""Presets: every hyper-parameter of a fit, as plain data.

A preset is a ``Preset`` dataclass registered in ``PRESETS`` under a name. The
training loop (``fit.py``) reads only these fields, so a new preset (a different
encoding, net size, batch, schedule, ...) needs no change to the loop:
``register_preset("name", Preset(...))``. ``resolve`` applies a user's
``overrides`` (``{"epochs": 10}``; ``encoding_params`` and ``weight_decay`` merge
key by key) and validates the result.

``paper`` reproduces McGinnis, Shit et al. (MICCAI 2023); each number's source is
in the comments and in README section "engine".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

SCHEDULES = ("cosine", "cosine-step", "constant")
INFERENCE_REGIONS = ("fov", "foreground")
PRECISIONS = ("float32", "tf32", "bfloat16")


@dataclass(frozen=True)
class Preset:
    # --- encoding (any name in encoding.ENCODINGS) ---
    encoding: str = "fourier"
    encoding_params: dict = field(default_factory=dict)
    # --- fields: trunk_layers x Linear+ReLU; heads: head_layers x Linear+ReLU, then Linear(.,1)
    trunk_width: int = 256
    trunk_layers: int = 3
    # > 0: the trunk's units are LeakyReLU with this slope (0 = ReLU, as in the paper).
    # fast with 0.01 (docs/fast-engine.md, round 9): icbm2009c truth-range PSNR up on
    # both contrasts and all 3 seeds with box profiles, but papersize point samples
    # T2w -0.4 dB on 2 seeds; left at 0 (opt-in: --override trunk_negative_slope=0.01)
    trunk_negative_slope: float = 0.0
    head_width: int = 128
    head_layers: int = 1
    # --- optimisation (Adam) ---
    batch_size: int = 1000  # LR voxels per step, all contrasts mixed
    # small volumes: the batch shrinks to ceil(voxels / min_steps_per_epoch), not below
    # min_batch_size, so an epoch still takes that many steps (fit.batch_size_for); 0 = off
    min_steps_per_epoch: int = 0
    min_batch_size: int = 256
    lr: float = 1e-3
    # learning rate of the MLPs (trunk, heads) when it must differ from the encoding's
    # (grids want a high rate; tiny ReLU heads die at it on small data); None = lr
    network_lr: float | None = None
    epochs: int = 20  # maximum; MI early stopping may end sooner
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    # weight decay per parameter group: "encoding" (e.g. grid tables) and "network" (MLPs)
    weight_decay: dict = field(default_factory=lambda: {"encoding": 0.0, "network": 0.0})
    schedule: str = "cosine"  # "cosine": per epoch over `epochs`; "cosine-step": per step
    warmup_steps: int = 0  # linear learning-rate warm-up (steps)
    # --- smoothness prior (fit._smoothness): weight x mean squared change of every
    # output between a point and one `smoothness_mm` away in a random direction, on a
    # quarter of each batch's voxel centres; 0 = off. It fills what no input constrains
    # (e.g. one contrast between its point-sampled slices) with smooth values.
    smoothness: float = 0.0
    smoothness_mm: float = 1.0
    # --- encoding diffusion (fit._train): every `diffusion_every` steps each node of
    # an encoding that has ``diffuse_`` (dense-grid) moves this fraction, times the
    # current learning-rate factor, toward the mean of its 6 neighbours. Nodes that
    # no sample constrains (between point-sampled slices) would otherwise keep their
    # initial noise or that of rare, Adam-amplified gradients; 0 = off.
    diffusion: float = 0.0
    diffusion_every: int = 8
    # > 0: diffuse only nodes the training data barely touch. A node's reach is the
    # trilinear weight that all LR samples put on it (each profile point 1/K); its
    # step is scaled by clip(1 - reach / diffusion_reach, 0, 1), so a node no sample
    # touches diffuses fully and one with >= diffusion_reach of weight not at all.
    # Only levels with nodes closer than half the widest unsampled stretch along a
    # slice axis (fit.sample_gap) take part; with contiguous box slices none does.
    # 0 = every node of every level alike.
    diffusion_reach: float = 0.0
    # not None: the finest grid level keeps nodes only within this many mm of the
    # inputs' foreground (their masks, with each voxel's slice profile), where the
    # data are; elsewhere it reads 0 and costs neither memory nor optimiser time
    finest_margin_mm: float | None = None
    # with finest_margin_mm: every grid level whose nodes are at most this many mm apart
    # (along its widest-spaced axis) is also stored only near the foreground, not just
    # the finest; 0 = the finest only
    margin_up_to_mm: float = 0.0
    # not None (grid encodings with a ``finest_mm``): the finest level's spacing is tuned
    # for inputs whose in-plane voxels are this size (mm). Along a world axis where some
    # input's in-plane voxels are smaller (clinical 0.5 mm pixels), the finest level is
    # made finer in proportion (not below the output voxel; at most
    # fit.MAX_REFINED_NODES nodes), one level is added per halving, and it is stored only
    # near the foreground (finest_margin_mm, 3 mm unless set), so the output keeps the
    # in-plane detail of the inputs (fit.finest_spacing).
    finest_reference_mm: float | None = None
    # Preset overrides applied (before the user's) when every input's slices are
    # contiguous: no stretch along a slice axis that the slice profile leaves out is
    # wider than the in-plane or output voxel (fit.contiguous_slices). Such data constrain
    # every 1 mm node, while gaps between point-sampled slices would let a 1 mm level
    # overfit; e.g. a finer grid level there. {} = none.
    contiguous_overrides: dict = dataclasses.field(default_factory=dict)
    # --- forward model ---
    profile_samples: int = 1  # K points across each LR voxel's slice (box profile); 1 = centre
    # fraction of an epoch drawn from inside the inputs' masks; None = every LR voxel once
    foreground_fraction: float | None = None
    # LR voxels farther than this (mm) from their input's mask are "far background": each
    # epoch draws a fresh random far_background_fraction of them (the rest of the LR voxels
    # every epoch). None = no such split; foreground_fraction, when set, replaces it.
    far_background_mm: float | None = None
    far_background_fraction: float = 1.0
    # --- joint pose refinement (pose.py): inputs that registration moved get a rigid
    # correction learned with the field, Adam at pose_lr degrees / mm per step from
    # epoch pose_start_epoch (0-based; the field first takes a rough shape). 0 = off.
    pose_lr: float = 0.0
    pose_start_epoch: int = 1
    # fraction of a refined input's targets per step that carry the pose gradient;
    # the rest train the field only (a coordinate gradient costs several plain steps)
    pose_sample_fraction: float = 0.125
    # --- intensities: (low, high) percentiles inside each input's mask -> 0 and 1 ---
    percentiles: tuple[float, float] = (1.0, 99.0)
    # --- MI monitoring and stopping (see mi.py) ---
    mi_samples: int = 50_000  # fixed seeded subsample of the output-grid foreground
    mi_bins: int = 32
    early_stopping: bool = True
    min_epochs: int = 10
    patience: int = 5
    window: int = 3
    rel_tol: float = 0.1
    # --- inference ---
    inference_region: str = "fov"  # "fov": union of the inputs' FOVs; "foreground": MI mask
    infer_chunk: int = 32_768  # output points per forward pass (bounds memory)
    # True: every output is clipped at its input's floor (fit.output_floor): 0 for a
    # magnitude image, the constant that fills the background of a signed one (z-scored
    # skull-stripped inputs). A field (or spline) overshoots below the background at hard
    # edges such as a skull-stripped brain's or where the input itself rings; MR magnitude
    # cannot be negative, and tools such as N4 reject negative voxels. Signed inputs with
    # no constant background (phase maps, z-scored whole heads) are not clipped.
    clip_to_floor: bool = False
    # --- arithmetic of the field's forward passes (fit._autocast) ---
    # "float32"; "tf32": float32 tensors, TF32 matrix products on CUDA (no effect on
    # the CPU); "bfloat16": torch.autocast of every forward pass (training, MI,
    # inference), the loss, gradients' accumulation and Adam in float32. Opt-in until
    # measured against float32 on a GPU (benchmarks/gpu/README.md).
    precision: str = "float32"

    def to_dict(self) -> dict:
        """JSON-serialisable copy (tuples become lists)."""
        return json_ready(dataclasses.asdict(self))


def json_ready(obj):
    """Recursively turn tuples into lists so ``json.dumps`` round-trips the value."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


#: Exactly the paper: Sec. 2 "Implementation and Training" + supplementary Tab. 3.
PAPER = Preset(
    encoding="fourier",
    # Tab. 3: Fourier distribution scale 4.0, scaling factor 1.0, 512 features
    # (Sec. 2: "512-dimensional Fourier Features" = 256 frequencies x (cos, sin)).
    encoding_params={"n_frequencies": 256, "sigma": 4.0, "factor": 1.0},
    # Tab. 3 "Num of layers 5", "Num of neurons 1024"; Sec. 2 "hidden dimension of 1024
    # for the shared layers": Linear(512,1024) + 4 x Linear(1024,1024), ReLU.
    trunk_width=1024,
    trunk_layers=5,
    # Sec. 2 "two layers with a hidden dimension of 512 for the heads":
    # Linear(1024,512) + ReLU + Linear(512,1).
    head_width=512,
    head_layers=1,
    batch_size=1000,  # Sec. 2 / Tab. 3
    lr=4e-4,  # Sec. 2 / Tab. 3, Adam
    epochs=50,  # Tab. 3
    schedule="cosine",  # Sec. 2 "Cosine annealing", annealed over the epochs
    profile_samples=1,  # point samples at LR voxel centres (Eq. 1 sums over voxel centres)
    foreground_fraction=None,  # every LR voxel once per epoch
    mi_bins=32,  # 32-bin histogram MI as in the authors' evaluation code
    min_epochs=10,
    patience=5,
    window=3,
    rel_tol=0.1,
)

#: CPU preset (issue 5; measurements in docs/fast-engine.md): dense multi-resolution
#: feature grids (no Fourier features) with a small split-head MLP, a box slice
#: profile, big batches and a high learning rate.
FAST = Preset(
    encoding="dense-grid",
    # 5 dense levels, 4 features each, node spacing 16 mm -> 1.33 mm (sized in mm
    # through the normaliser, so any field of view gets the same cells). Finer
    # (1 mm) levels overfit the slices; 2 mm loses in-plane detail (T1w -0.2 dB).
    encoding_params={
        "n_levels": 5,
        "features_per_level": 4,
        "coarsest_mm": 16.0,
        "finest_mm": 1.33,
        "init_std": 1e-2,
    },
    trunk_width=32,  # the grid holds the detail; the shared trunk only mixes features
    trunk_layers=2,
    head_width=16,
    head_layers=1,
    batch_size=8192,
    # a paper-size subject has ~350 steps of 8192 per epoch; a small crop (the CI
    # check, a phantom) takes smaller batches instead of a handful of steps
    min_steps_per_epoch=300,
    min_batch_size=64,
    lr=1e-2,  # grids need a high rate; 5e-3 lost to cubic spline on both contrasts
    # Adam's second moment over ~20 steps instead of ~1000 (beta2 0.999): grid nodes
    # see bursts of gradient as batches pass their cells, and a short memory keeps
    # the step sizes in tune. Paper size, 6 epochs, truth-range PSNR T1w / T2w: box
    # profile 31.58 / 33.64 dB (0.999: 30.53 / 33.02), point samples 28.23 / 28.94
    # (27.35 / 28.23); SSIM up in both modes, both seeds tried (docs/fast-engine.md,
    # round 4). 0.99 is in between.
    adam_betas=(0.9, 0.95),
    # 6 epochs fit the 3-minute budget since the gather lookup (round 4): paper size
    # 123 s end to end with box profiles. 6 vs 4 (truth-range PSNR): +0.8 / +0.9 dB
    # with box profiles, +0.3 / -0.1 with point samples; MS patient's FLAIR and lesion
    # contrast up in both modes. Contiguous slices get 8 lighter ones (below).
    epochs=6,
    schedule="cosine-step",
    # Reach-limited diffusion: every 8 steps, nodes that the training points touch
    # with less than 1 (summed trilinear weight) move toward their neighbours' mean,
    # fully when untouched. Only point-sampled or gapped slices leave such nodes (the
    # finest level, between slices); contiguous box slices leave none, so nothing is
    # counted or diffused there and those fits are unchanged. icbm2009c point samples,
    # truth-range PSNR T1w / T2w +0.66 / +0.42 dB, SSIM +0.009 / +0.013; the MS
    # patient's FLAIR -0.09 dB, lesion/WM contrast 0.238 -> 0.248 (docs/fast-engine.md,
    # round 5). Uniform diffusion (diffusion_reach 0) blurred that FLAIR by 5 dB.
    diffusion=1.0,
    diffusion_every=8,
    diffusion_reach=1.0,
    # Contiguous slices (box profiles with no gap, or isotropic inputs) constrain every
    # 1 mm node, so they get a sixth level, 16 mm -> 1.0 mm (geometric), whose nodes are
    # stored only within 3 mm of the inputs' foreground (a brain fills about a sixth
    # of the field's cube). icbm2009c box profiles, medians of 3 seeds: truth-range PSNR
    # T1w +0.21, T2w +1.17 dB, SSIM up on both; papersize 137.5 s end to end instead
    # of 121 s (medians of 3), and less memory. Point-sampled slices keep the 5 levels: a 1 mm level
    # overfits their gaps (docs/fast-engine.md, rounds 6-7).
    contiguous_overrides={
        "encoding_params": {"n_levels": 6, "finest_mm": 1.0},
        "finest_margin_mm": 3.0,
        # With the levels finer than 2 mm stored near the foreground only, LR voxels more
        # than 8 mm from their input's mask only pin the constant background that the
        # coarse levels and the network draw: each epoch takes a fresh quarter of them.
        # Half of a head's LR voxels are that far, so an epoch costs about 0.6 of a full
        # pass, and 8 such epochs less than 6 full ones. icbm2009c box profiles, medians
        # of 3 seeds: min-max PSNR T1w +1.00, T2w +0.10 dB, truth range -0.03 / +0.06;
        # 0.72x the time (papersize 0.87x). Point samples keep 6 full epochs: every level is
        # dense there, and the same change cost T1w 0.16 dB truth range (round 13 of
        # docs/fast-engine.md).
        "far_background_mm": 8.0,
        "far_background_fraction": 0.25,
        "epochs": 8,
    },
    # Wherever the finest level is stored near the foreground only (above, or a level
    # refined for clinical pixels), so are the others up to 2 mm (the 1.74 mm level at
    # 1 mm): the background needs no fine nodes, and optimiser time follows the table
    # sizes (docs/fast-engine.md, round 12).
    margin_up_to_mm=2.0,
    # The levels above were tuned on 1 mm in-plane voxels. Clinical scans often have
    # 0.5-0.7 mm pixels, which 1.33 mm nodes blur: on a real 3-contrast clinical
    # session (crop), re-acquiring the outputs on the inputs' grids gave 29.9 / 28.0 /
    # 30.2 dB against the inputs, below cubic spline's 32.7 / 29.5 / 32.9, with 32-42 %
    # of the inputs' sub-1.33 mm detail missing; this rule (0.68 x 0.68 x 1.33 mm there)
    # gave 35.9 / 32.6 / 35.3 dB, 11-12 % missing (docs/fast-engine.md, round 10).
    finest_reference_mm=1.0,
    # inputs that registration moved get a rigid correction learned with the field:
    # the MI optimum of thick-slice pairs sits a few tenths of a mm off the truth
    # (docs/registration.md, "Joint pose refinement"); header-kept inputs never move
    pose_lr=0.01,
    # outputs below the input's background (0 for magnitude) are overshoot
    # (docs/fast-engine.md, rounds 7 and 13)
    clip_to_floor=True,
    # K for a slice as thick as its spacing; a thinner SliceThickness gets fewer points
    profile_samples=4,  # box profile: the model learns what a thick slice integrates
    # off: weight 1 rescued a seed whose point-sampled icbm-quick fit filled the slice
    # gaps with garbage (T1w SSIM 0.20 -> 0.81) but cost a box-profile phantom 3-7 dB;
    # untested at paper size (docs/fast-engine.md, round 2)
    smoothness=0.0,
    foreground_fraction=None,
    mi_samples=20_000,
    min_epochs=3,
    patience=2,
    window=2,
    rel_tol=0.1,
)

PRESETS: dict[str, Preset] = {"paper": PAPER, "fast": FAST}


def register_preset(name: str, preset: Preset, replace: bool = False) -> None:
    """Add (or with ``replace=True`` overwrite) a named preset."""
    if name in PRESETS and not replace:
        raise ValueError(f"preset {name!r} already exists")
    PRESETS[name] = preset


def resolve(name: str, overrides: dict | None = None) -> Preset:
    """The preset ``name`` with ``overrides`` applied, validated.

    Raises ``ValueError`` naming the bad key or value.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    base = PRESETS[name]
    overrides = dict(overrides or {})
    known = {f.name for f in dataclasses.fields(Preset)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown preset override(s) {unknown}; known: {', '.join(sorted(known))}")
    if "weight_decay" in overrides:
        overrides["weight_decay"] = {**base.weight_decay, **overrides["weight_decay"]}
    # Encoding parameters merge into the base's only while the encoding stays the same.
    if "encoding_params" in overrides and overrides.get("encoding", base.encoding) == base.encoding:
        overrides["encoding_params"] = {**base.encoding_params, **overrides["encoding_params"]}
    elif "encoding" in overrides and overrides["encoding"] != base.encoding:
        overrides.setdefault("encoding_params", {})
    for key in ("adam_betas", "percentiles"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    preset = dataclasses.replace(base, **overrides)
    validate(preset)
    return preset


def merge_overrides(first: dict, then: dict) -> dict:
    """Overrides ``first`` followed by ``then``; the dict-valued fields merge key by key."""
    out = {**first, **then}
    for key in ("encoding_params", "weight_decay"):
        if key in first and key in then:
            out[key] = {**first[key], **then[key]}
    return out


def validate(p: Preset) -> None:
    """Raise ``ValueError`` for an inconsistent preset."""
    checks = [
        (p.batch_size >= 1, "batch_size must be >= 1"),
        (
            p.min_steps_per_epoch >= 0 and p.min_batch_size >= 1,
            "min_steps_per_epoch must be >= 0, min_batch_size >= 1",
        ),
        (p.smoothness >= 0 and p.smoothness_mm > 0, "smoothness >= 0, smoothness_mm > 0"),
        (
            0 <= p.diffusion <= 1 and p.diffusion_every >= 1 and p.diffusion_reach >= 0,
            "0 <= diffusion <= 1, diffusion_every >= 1, diffusion_reach >= 0",
        ),
        (
            (p.finest_margin_mm is None or p.finest_margin_mm >= 0) and p.margin_up_to_mm >= 0,
            "finest_margin_mm must be None or >= 0, margin_up_to_mm >= 0",
        ),
        (
            p.finest_reference_mm is None or p.finest_reference_mm > 0,
            "finest_reference_mm must be None or > 0",
        ),
        (
            set(p.contiguous_overrides) <= {f.name for f in dataclasses.fields(Preset)}
            and "contiguous_overrides" not in p.contiguous_overrides,
            "contiguous_overrides takes preset fields (not itself)",
        ),
        (p.lr > 0, "lr must be > 0"),
        (p.network_lr is None or p.network_lr > 0, "network_lr must be None or > 0"),
        (p.epochs >= 1, "epochs must be >= 1"),
        (p.trunk_width >= 1 and p.trunk_layers >= 1, "trunk_width and trunk_layers must be >= 1"),
        (0 <= p.trunk_negative_slope < 1, "trunk_negative_slope must be in [0, 1)"),
        (p.head_layers >= 0 and p.head_width >= 1, "head_layers must be >= 0, head_width >= 1"),
        (p.profile_samples >= 1, "profile_samples must be >= 1"),
        (
            p.foreground_fraction is None or 0 < p.foreground_fraction <= 1,
            "foreground_fraction must be None or in (0, 1]",
        ),
        (
            (p.far_background_mm is None or p.far_background_mm >= 0)
            and 0 < p.far_background_fraction <= 1,
            "far_background_mm must be None or >= 0, far_background_fraction in (0, 1]",
        ),
        (
            0 <= p.percentiles[0] < p.percentiles[1] <= 100,
            "percentiles must be 0 <= low < high <= 100",
        ),
        (p.mi_samples >= 100 and p.mi_bins >= 2, "mi_samples must be >= 100 and mi_bins >= 2"),
        (
            p.min_epochs >= 1 and p.patience >= 1 and p.window >= 1,
            "min_epochs, patience, window must be >= 1",
        ),
        (0 < p.rel_tol < 1, "rel_tol must be in (0, 1)"),
        (p.pose_lr >= 0 and p.pose_start_epoch >= 0, "pose_lr and pose_start_epoch must be >= 0"),
        (0 < p.pose_sample_fraction <= 1, "pose_sample_fraction must be in (0, 1]"),
        (p.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}"),
        (p.precision in PRECISIONS, f"precision must be one of {PRECISIONS}"),
        (
            p.inference_region in INFERENCE_REGIONS,
            f"inference_region must be one of {INFERENCE_REGIONS}",
        ),
        (p.infer_chunk >= 1 and p.warmup_steps >= 0, "infer_chunk must be >= 1, warmup_steps >= 0"),
        (
            set(p.weight_decay) <= {"encoding", "network"},
            "weight_decay keys are 'encoding' and 'network'",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"invalid preset: {message}")
