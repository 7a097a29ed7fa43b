#!/usr/bin/env python3
"""Pre-fetch the TemplateFlow files mcsr uses into ``$TEMPLATEFLOW_HOME`` (image build step).

The Docker image runs this once at build time so that ``--output-space
MNI152NLin2009cAsym`` never downloads at run time (the container may have no network and a
read-only root). Files already present and intact are not downloaded again, so the script also
verifies an existing cache offline (tests/test_container.py does that).

Every file is checked by decompressing it fully with nibabel: TemplateFlow's downloader leaves a
truncated file behind when a transfer breaks, and such a file would otherwise look "present"
to every later run. Exit status 0 when all files are intact, 1 otherwise (one line per failure
on stderr).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TEMPLATE = "MNI152NLin2009cAsym"

# TemplateFlow queries (entities of templateflow.api.get) for the files bids_mcsr/templates.py
# reads: the 1 mm T1w template (head and brain-extracted) for rigid alignment, and its brain
# mask. Add a query here when templates.py starts using another file.
QUERIES: tuple[dict, ...] = (
    {"resolution": 1, "desc": None, "suffix": "T1w"},
    {"resolution": 1, "desc": "brain", "suffix": "T1w"},
    {"resolution": 1, "desc": "brain", "suffix": "mask"},
)

ATTEMPTS = 3


def _check(path: Path) -> str | None:
    """Why ``path`` is not a usable 3-D NIfTI volume, or None when it is."""
    import nibabel as nib
    import numpy as np

    if not path.is_file() or path.stat().st_size == 0:
        return "missing or empty"
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)  # full decompression: catches truncated gzip
    except Exception as exc:  # noqa: BLE001 - any read failure means "re-fetch"
        return f"unreadable ({exc.__class__.__name__}: {exc})"
    if data.ndim != 3 or not np.isfinite(data).all() or not data.any():
        return f"not a finite, non-empty 3-D volume (shape {data.shape})"
    return None


def fetch(query: dict) -> Path:
    """Fetch one TemplateFlow file (retrying a broken transfer) and return its verified path."""
    from templateflow import api

    problem = "not fetched"
    for _ in range(ATTEMPTS):
        try:
            found = api.get(TEMPLATE, **query)
        except Exception as exc:  # noqa: BLE001 - network and S3 errors vary by version
            problem = f"{exc.__class__.__name__}: {exc}".splitlines()[0]
            continue
        if not isinstance(found, Path):
            raise LookupError(f"{TEMPLATE} {query} matches {len(found)} files, expected one")
        problem = _check(found)
        if problem is None:
            return found
        # An empty file is what makes TemplateFlow download it again on the next attempt.
        found.write_bytes(b"")
    raise RuntimeError(f"{TEMPLATE} {query}: {problem}")


def main() -> int:
    home = os.environ.get("TEMPLATEFLOW_HOME")
    if not home:
        print("fetch_templates: set TEMPLATEFLOW_HOME to the directory to fill", file=sys.stderr)
        return 1
    failures = 0
    for query in QUERIES:
        try:
            path = fetch(query)
        except (RuntimeError, LookupError) as exc:
            print(
                f"fetch_templates: {exc} (TEMPLATEFLOW_HOME={home}; the build needs network "
                "access to templateflow.s3.amazonaws.com)",
                file=sys.stderr,
            )
            failures += 1
            continue
        print(f"fetch_templates: {path.name} ok ({path.stat().st_size / 1e6:.1f} MB)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
