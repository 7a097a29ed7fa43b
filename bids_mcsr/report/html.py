"""Minimal HTML building blocks shared by the participant and group reports.

The pages are self-contained: inline CSS, images as data URIs, no scripts, so a
report opens offline, from a cluster's scratch space or an e-mail attachment.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from ..derivatives import atomic_write_text

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       color: #212121; background: #fafafa; line-height: 1.4; }
main { max-width: 1180px; margin: 0 auto; padding: 16px 28px 48px; }
h1 { font-size: 1.6em; margin: 0.4em 0 0.1em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 2px solid #1565c0; padding-bottom: 2px; }
h3 { font-size: 1.05em; margin: 1.2em 0 0.3em; }
p.sub { color: #616161; margin-top: 0; }
p.note { color: #424242; font-size: 0.9em; max-width: 60em; }
table { border-collapse: collapse; font-size: 0.86em; margin: 0.5em 0; background: white; }
th, td { border: 1px solid #e0e0e0; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eceff1; }
td { white-space: nowrap; }
td:last-child { white-space: normal; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.flag td { background: #ffebee; }
span.flag { color: #b71c1c; font-weight: 600; }
span.ok { color: #2e7d32; }
img { max-width: 100%; height: auto; display: block; margin: 4px 0 10px; }
nav a { margin-right: 1em; }
details { margin: 0.6em 0; }
summary { cursor: pointer; color: #1565c0; }
code { font-size: 0.95em; }
"""


def esc(value: object) -> str:
    """HTML-escaped text of any value (``n/a`` for None)."""
    return html.escape("n/a" if value is None else str(value))


def page(title: str, body: str) -> str:
    """A complete HTML5 document with the shared stylesheet."""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n"
        f"<body><main>\n{body}\n</main></body>\n</html>\n"
    )


def img(uri: str, alt: str) -> str:
    """An embedded image (``uri`` is a data URI from ``figures.data_uri``)."""
    return f'<img src="{uri}" alt="{esc(alt)}">'


def table(
    header: Sequence[str],
    rows: Iterable[Sequence[str]],
    numeric: Sequence[bool] | None = None,
    row_classes: Sequence[str] | None = None,
) -> str:
    """A table; cells are trusted HTML (escape them with :func:`esc` first)."""
    numeric = numeric or [False] * len(header)
    out = ["<table>", "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        cells = "".join(
            f'<td class="num">{c}</td>' if numeric[j] else f"<td>{c}</td>"
            for j, c in enumerate(row)
        )
        out.append(f"<tr{cls}>{cells}</tr>")
    out.append("</table>")
    return "\n".join(out)


def key_value_table(items: Mapping[str, object]) -> str:
    """Two-column table of a (possibly nested) mapping; nested keys joined with dots."""
    return table(["item", "value"], [(esc(k), esc(v)) for k, v in _flatten(items).items()])


def _flatten(items: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in items.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = ", ".join(str(v) for v in value) if value else "[]"
        else:
            out[name] = value
    return out


def fmt(value: object, digits: int = 2) -> str:
    """A number with ``digits`` decimals (escaped text otherwise, ``n/a`` for None)."""
    if isinstance(value, bool) or value is None:
        return esc(value)
    try:
        return f"{float(value):.{digits}f}"  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return esc(value)


def write(path: Path, document: str) -> Path:
    """Write a report atomically (a reader never sees half a page)."""
    return atomic_write_text(Path(path), document)
