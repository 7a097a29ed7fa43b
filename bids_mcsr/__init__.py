"""mcsr: subject-specific multi-contrast MRI super-resolution (BIDS App)."""

from pathlib import Path


def _read_version() -> str:
    # The repository's ``version`` file is the single source: a source checkout
    # reads it directly, an installed package got it at build time.
    src = Path(__file__).resolve().parent.parent / "version"
    if src.is_file():
        return src.read_text().strip()
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bids-mcsr")
    except PackageNotFoundError:  # pragma: no cover - broken install
        return "0+unknown"


__version__ = _read_version()
