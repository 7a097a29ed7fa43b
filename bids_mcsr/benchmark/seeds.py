"""Benchmark rows over seeds: medians, runs made apart folded together, and the gates.

A row scores one setting (case, mode, partner view, motion), contrast and method.
Run with several seeds it holds the median of every metric of :data:`SEED_METRICS`
and each seed's own under ``seed_runs``; a row of one seed holds that seed's values
and names it in ``seeds``. Seeds may also be run apart (one ``--seed`` per run, e.g.
to keep each run short) and merged: :func:`fold_seeds` makes the same row of them.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

#: Metrics whose per-seed values are kept and whose median is the table's value.
SEED_METRICS = (
    "psnr",
    "psnr_tr",
    "ssim",
    "eps_mi",
    "eps_hat",
    "lesion_psnr",
    "lesion_psnr_tr",
    "lesion_contrast",
    "reg_mean_mm",
    "reg_max_mm",
)


def combine_seeds(runs: Sequence[tuple[int, dict, dict, dict]]) -> dict:
    """One row's fields for one contrast from its per-seed ``(seed, record, facts, scores)``.

    A single run is returned as it is. For several: each of ``SEED_METRICS`` is the
    median over the seeds, wall and fit seconds the median over every run, peak RSS
    the maximum, integer facts (epochs) the lower median; ``seed_runs`` lists each
    seed's own metrics. Any failed seed fails the row (its ``error`` is kept).
    """
    if len(runs) == 1:
        _, record, facts, scores = runs[0]
        return {**record, **facts, **scores}
    failed = [record for _, record, _, _ in runs if "error" in record]
    if failed:
        return dict(failed[0])
    first = runs[0]
    row = {**first[1], **first[2], **first[3]}
    row["wall_s_runs"] = [w for _, record, _, _ in runs for w in record["wall_s_runs"]]
    row["wall_s"] = statistics.median(row["wall_s_runs"])
    fits = [record["fit_s"] for _, record, _, _ in runs if record.get("fit_s") is not None]
    row["fit_s"] = statistics.median(fits) if fits else None
    row["peak_rss_mb"] = max(record["peak_rss_mb"] for _, record, _, _ in runs)
    gpu = [facts["peak_gpu_mb"] for _, _, facts, _ in runs if facts.get("peak_gpu_mb") is not None]
    row["peak_gpu_mb"] = max(gpu) if gpu else None
    row["regridded"] = any(record["regridded"] for _, record, _, _ in runs)
    for key, middle in (
        ("samples_per_s", statistics.median),
        ("epochs", statistics.median_low),
        ("selected_epoch", statistics.median_low),
    ):
        values = [facts[key] for _, _, facts, _ in runs if facts.get(key) is not None]
        if values:
            row[key] = middle(values)
    seed_medians(row, [(seed, scores) for seed, _, _, scores in runs])
    return row


def seed_medians(row: dict, per_seed: Sequence[tuple[int, dict]]) -> None:
    """Set each of ``SEED_METRICS`` in ``row`` to its median over ``(seed, scores)``
    (only where every seed has it) and list each seed's own under ``seed_runs``."""
    for key in SEED_METRICS:
        values = [scores[key] for _, scores in per_seed if key in scores]
        if len(values) == len(per_seed):
            row[key] = statistics.median(values)
    row["seed_runs"] = [
        {"seed": seed, **{k: scores[k] for k in SEED_METRICS if k in scores}}
        for seed, scores in per_seed
    ]


def seed_scores(row: dict) -> list[dict]:
    """Each seed's own metrics of ``row`` (``{"seed": S, metric: value, ...}``).

    Its ``seed_runs`` when it has them, else the row's own values under its one seed
    (``seeds[0]``; 0 for rows saved before seeds were recorded).
    """
    if row.get("seed_runs"):
        return [dict(run) for run in row["seed_runs"]]
    seed = (row.get("seeds") or [0])[0]
    return [{"seed": seed, **{k: row[k] for k in SEED_METRICS if k in row}}]


def fold_seeds(rows: Sequence[dict]) -> dict:
    """One row from rows of the same setting, contrast and method made by separate runs.

    Every seed counts once (a seed run twice keeps its first row's scores); the
    metrics are the medians over all seeds, as one run with ``--seed`` of all of
    them would give. Wall and fit seconds are medians over the runs, peak memory
    the maximum. A failed row fails the fold (its ``error`` is kept).
    """
    if len(rows) == 1:
        return dict(rows[0])
    row = combine_seeds([(0, r, r, {}) for r in rows])
    if "error" in row:
        return row
    per_seed: dict[int, dict] = {}
    for r in rows:
        for run in seed_scores(r):
            per_seed.setdefault(run["seed"], run)
    seeds = sorted(per_seed)
    row["seeds"] = seeds
    if len(seeds) == 1:
        row.pop("seed_runs", None)
        row.update({k: v for k, v in per_seed[seeds[0]].items() if k != "seed"})
    else:
        seed_medians(row, [(s, per_seed[s]) for s in seeds])
    return row


def add_seed_gains(row: dict, spline: dict) -> None:
    """Each of ``row``'s ``seed_runs`` gets ``gain_tr_db`` and ``ssim_gain`` against
    ``spline``'s run of the same seed (its only values when it ran once: with
    ``--no-registration`` the spline is deterministic)."""
    if not row.get("seed_runs"):
        return
    ref = {run["seed"]: run for run in seed_scores(spline)}
    only = next(iter(ref.values())) if len(ref) == 1 else None
    runs = []
    for run in row["seed_runs"]:
        run = dict(run)  # the list may be shared with the row merge() copied
        base = ref.get(run["seed"], only)
        for key, gain in (("psnr_tr", "gain_tr_db"), ("ssim", "ssim_gain")):
            if base is not None and run.get(key) is not None and base.get(key) is not None:
                run[gain] = run[key] - base[key]
        runs.append(run)
    row["seed_runs"] = runs


def gate_rows(rows: Sequence[dict]) -> list[dict]:
    """The worst case of every setting per case, mode, contrast and (INR) method.

    Over partner views and motions: the least median gain over spline (truth-range
    PSNR, dB), the least gain of any single seed, the least SSIM gain of any seed,
    the largest MI error (``eps_mi``) of any seed, and the largest mean registration
    error of any seed on aligned and on moved inputs (mm). Rows that failed are left
    out; ``settings`` counts the rows each line covers.
    """
    out: dict[tuple, dict] = {}
    for r in rows:
        if r["method"] == "spline" or "error" in r or r.get("gain_tr_db") is None:
            continue
        key = (r["case"], r["mode"], r["contrast"], r["method"])
        g = out.setdefault(
            key,
            {
                **dict(zip(("case", "mode", "contrast", "method"), key, strict=True)),
                "settings": 0,
                "gain_tr_median_min": float("inf"),
                "gain_tr_seed_min": float("inf"),
                "ssim_gain_seed_min": float("inf"),
                "eps_mi_max": float("-inf"),
                "reg_aligned_max_mm": None,
                "reg_moved_max_mm": None,
            },
        )
        g["settings"] += 1
        g["gain_tr_median_min"] = min(g["gain_tr_median_min"], r["gain_tr_db"])
        runs = r.get("seed_runs") or [
            {**seed_scores(r)[0], "gain_tr_db": r["gain_tr_db"], "ssim_gain": r.get("ssim_gain")}
        ]
        for run in runs:
            for field, value, pick in (
                ("gain_tr_seed_min", run.get("gain_tr_db"), min),
                ("ssim_gain_seed_min", run.get("ssim_gain"), min),
                ("eps_mi_max", run.get("eps_mi"), max),
            ):
                if value is not None:
                    g[field] = pick(g[field], value)
            reg = run.get("reg_mean_mm")
            if reg is not None:
                field = (
                    "reg_aligned_max_mm"
                    if r.get("motion", "none") == "none"
                    else "reg_moved_max_mm"
                )
                g[field] = reg if g[field] is None else max(g[field], reg)
    for g in out.values():
        for k, v in g.items():
            if isinstance(v, float) and abs(v) == float("inf"):
                g[k] = None
    return list(out.values())
