"""Markdown tables of benchmark rows (plain dicts, as saved in the JSON)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

#: (row key, column header, decimals) of the main results table.
MAIN_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("case", "case", 0),
    ("mode", "mode", 0),
    ("view", "partner view", 0),
    ("contrast", "contrast", 0),
    ("method", "method", 0),
    ("psnr", "PSNR dB", 2),
    ("ssim", "SSIM", 4),
    ("gain_db", "gain dB", 2),
    ("psnr_tr", "PSNR truth-range dB", 2),
    ("gain_tr_db", "gain truth-range dB", 2),
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

#: Columns of the lesion table (ms-patient07).
LESION_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("case", "case", 0),
    ("mode", "mode", 0),
    ("view", "partner view", 0),
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
