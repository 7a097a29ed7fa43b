"""Exceptions that carry the process exit code and a one-line message.

The CLI catches :class:`McsrError` and prints ``mcsr: error: <message>``; the
message names the offending file or option and says how to fix it.

Exit codes (documented in the README, section "Exit codes, errors and re-runs"):

* 0  every requested participant/session done (or skipped as already complete)
* 1  some participants failed (the others were processed)
* 64 bad usage (options, paths)
* 65 bad input dataset (not BIDS, validator errors, no such participant)
* 73 output directory cannot be created or written
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 64
EXIT_DATAERR = 65
EXIT_CANTCREAT = 73


class McsrError(Exception):
    """Base class: a user-facing error with an exit code."""

    exit_code = EXIT_FAILED


class UsageError(McsrError):
    """Bad command line: unknown option, impossible value, output inside bids_dir."""

    exit_code = EXIT_USAGE


class DatasetError(McsrError):
    """The input dataset as a whole is unusable (not BIDS, validator errors, no such subject)."""

    exit_code = EXIT_DATAERR


class OutputError(McsrError):
    """The output (or work) directory cannot be created or written."""

    exit_code = EXIT_CANTCREAT


class ParticipantError(McsrError):
    """One participant/session cannot be processed; the others still run."""

    exit_code = EXIT_FAILED


class ImageError(ParticipantError):
    """One NIfTI input is unreadable or invalid; the message names the file and the fix."""


class NotEnoughContrasts(ParticipantError):
    """Fewer than two usable contrasts: the participant/session is skipped, not failed."""
