"""Markdown tables of benchmark rows (plain dicts, as saved in the JSON)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from .seeds import gate_rows

#: (row key, column header, decimals) of the main results table.
MAIN_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("case", "case", 0),
    ("mode", "mode", 0),
    ("view", "partner view", 0),
    ("motion", "motion", 0),
    ("contrast", "contrast", 0),
    ("method", "method", 0),
    ("psnr_tr", "PSNR truth-range dB", 2),
    ("gain_tr_db", "gain truth-range dB", 2),
    ("ssim", "SSIM", 4),
    ("ssim_gain", "SSIM gain", 4),
    ("psnr", "PSNR min-max dB", 2),
    ("gain_db", "gain min-max dB", 2),
    ("eps_mi", "eps MI", 3),
    ("eps_hat", "eps-hat MI", 3),
    ("wall_s", "wall s", 1),
    ("fit_s", "fit s", 1),
    ("peak_rss_mb", "peak RSS MB", 0),
    ("peak_gpu_mb", "peak GPU MB", 0),
    ("samples_per_s", "samples/s", 0),
    ("epochs", "epochs", 0),
    ("device", "device", 0),
)

#: Columns of the registration table: the app's registration against the known truth.
REG_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("case", "case", 0),
    ("mode", "mode", 0),
    ("view", "partner view", 0),
    ("motion", "motion", 0),
    ("method", "method", 0),
    ("reg_mean_mm", "mean error mm", 3),
    ("reg_max_mm", "max error mm", 3),
    ("reg_worst_mean_mm", "worst seed mean mm", 3),
)

#: Columns of the gates table (``seeds.gate_rows``): the worst setting per contrast.
GATE_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("case", "case", 0),
    ("mode", "mode", 0),
    ("contrast", "contrast", 0),
    ("method", "method", 0),
    ("settings", "settings", 0),
    ("gain_tr_median_min", "least median gain truth-range dB", 2),
    ("gain_tr_seed_min", "least seed gain truth-range dB", 2),
    ("ssim_gain_seed_min", "least seed SSIM gain", 4),
    ("eps_mi_max", "largest eps MI", 3),
    ("reg_aligned_max_mm", "largest registration error aligned mm", 3),
    ("reg_moved_max_mm", "largest registration error moved mm", 3),
)

#: Columns of the lesion table (ms-patient07).
LESION_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("case", "case", 0),
    ("mode", "mode", 0),
    ("view", "partner view", 0),
    ("motion", "motion", 0),
    ("method", "method", 0),
    ("lesion_psnr", "lesion PSNR dB", 2),
    ("lesion_psnr_gain_db", "lesion gain dB", 2),
    ("lesion_psnr_tr", "lesion PSNR truth-range dB", 2),
    ("lesion_psnr_tr_gain_db", "lesion gain truth-range dB", 2),
    ("lesion_contrast", "lesion/WM contrast", 3),
    ("lesion_contrast_truth", "truth contrast", 3),
    ("lesion_contrast_vs_spline", "contrast / spline", 3),
)


def format_value(value: object, decimals: int) -> str:
    """One table cell: ``-`` for missing/NaN, fixed decimals for floats, ``|`` escaped."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = f"{value:.{decimals}f}"
        return "0" if decimals == 0 and text == "-0" else text
    return str(value).replace("|", "\\|")


def markdown_table(
    rows: Sequence[Mapping[str, object]], columns: Sequence[tuple[str, str, int]]
) -> str:
    """GitHub-flavoured markdown table; numeric columns right-aligned."""
    numeric = [
        any(isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) for r in rows)
        for key, _, _ in columns
    ]
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---:" if n else "---" for n in numeric) + "|"
    body = [
        "| " + " | ".join(format_value(r.get(k), d) for k, _, d in columns) + " |" for r in rows
    ]
    return "\n".join([head, rule, *body])


def registration_rows(rows: Sequence[Mapping[str, object]]) -> list[dict]:
    """One row per setting and method with registration errors (seed medians, and the
    worst seed's mean), from the results rows (which repeat them per scored contrast)."""
    out: dict[tuple, dict] = {}
    for r in rows:
        if r.get("reg_mean_mm") is None:
            continue
        key = (r["case"], r["mode"], r["view"], r.get("motion", "none"), r["method"])
        per_seed = [run["reg_mean_mm"] for run in r.get("seed_runs", []) if "reg_mean_mm" in run]
        out.setdefault(
            key,
            {
                **dict(zip(("case", "mode", "view", "motion", "method"), key, strict=True)),
                "reg_mean_mm": r["reg_mean_mm"],
                "reg_max_mm": r.get("reg_max_mm"),
                "reg_worst_mean_mm": max(per_seed) if per_seed else r["reg_mean_mm"],
            },
        )
    return list(out.values())


def _header(results: dict) -> list[str]:
    """Date, commit, machine and settings of one saved run (markdown bullets)."""
    m, st = results["machine"], results["settings"]
    gpu = m["gpu"] or "none"
    return [
        f"- date: {m['date_utc']}; commit `{m['commit']}`"
        + (" (+ local changes)" if m["dirty"] else ""),
        f"- machine: {m['cpu']}, {m['cores']} cores, GPU: {gpu}; Python {m['python']}, torch {m['torch']}",
        f"- settings: cases {st['cases']}, methods {st['methods']}, modes {st['modes']}, partner "
        f"views {st['views']}, slice thickness {st['thickness']} mm, repeats {st['repeats']} "
        f"(wall s = median), seeds {_seeds_text(st)}, "
        f"epochs {st['epochs'] or 'preset default'}, paper preset epochs "
        f"{st['paper_epochs']}, registration "
        f"{'on' if st['registration'] else 'off (--no-registration)'}"
        + (f", overrides {st['overrides']}" if st.get("overrides") else ""),
    ]


def _seeds_text(settings: dict) -> str:
    seeds = settings.get("seeds", [settings.get("seed", 0)])  # runs before --seed took several
    return str(seeds[0]) if len(seeds) == 1 else f"{seeds} (metrics = median over seeds)"


def seed_table(rows: Sequence[dict]) -> str:
    """Markdown: each seed's PSNR / truth-range PSNR / SSIM for rows run with several seeds."""
    lines = [
        "| case | mode | partner view | motion | contrast | method | seed | PSNR truth-range dB "
        "| gain truth-range dB | SSIM | PSNR min-max dB | registration error mm |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for run in r.get("seed_runs", []):
            cells = [r["case"], r["mode"], r["view"], r.get("motion", "none"), r["contrast"]]
            cells += [r["method"], str(run["seed"])]
            keys = (("psnr_tr", 2), ("gain_tr_db", 2), ("ssim", 4), ("psnr", 2), ("reg_mean_mm", 3))
            cells += [format_value(run.get(k), d) for k, d in keys]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(results: dict) -> str:
    """Markdown: header (machine, commit, settings), main table, lesion table, notes.

    A merged result (``merge``) lists the header of every run it combines.
    """
    sources = results.get("sources") or [results]
    lines = [
        *[line for src in sources for line in _header(src)],
        "",
        markdown_table(results["rows"], MAIN_COLUMNS),
    ]
    reg_rows = registration_rows(results["rows"])
    if reg_rows:
        lines += [
            "",
            "Registration against the known truth:",
            "",
            markdown_table(reg_rows, REG_COLUMNS),
        ]
    gates = gate_rows(results["rows"])
    if gates:
        lines += [
            "",
            "Worst setting per contrast (over partner views, motions and seeds):",
            "",
            markdown_table(gates, GATE_COLUMNS),
        ]
    lesion_rows = [r for r in results["rows"] if "lesion_psnr" in r]
    if lesion_rows:
        lines += ["", markdown_table(lesion_rows, LESION_COLUMNS)]
    seeded = [r for r in results["rows"] if r.get("seed_runs")]
    if seeded:
        lines += ["", "Per seed (the rows above give the medians):", "", seed_table(seeded)]
    failed = [r for r in results["rows"] if "error" in r]
    if failed:
        lines += ["", "Failed runs:"]
        lines += [
            f"- {r['case']} {r['mode']} {r['view']} {r.get('motion', 'none')} {r['method']}: "
            f"{r['error']}"
            for r in failed
        ]
    if results["notes"]:
        lines += ["", "Notes:", *[f"- {n}" for n in results["notes"]]]
    return "\n".join(lines) + "\n"
