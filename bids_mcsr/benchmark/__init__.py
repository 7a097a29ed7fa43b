"""Reproducible fidelity and speed benchmark of mcsr, run through its CLI.

``python -m bids_mcsr.benchmark --help``; modules: :mod:`.simulate` (thick-slice
simulation), :mod:`.cases` (shipped and user cases), :mod:`.dataset` (BIDS
writing), :mod:`.runner` (CLI child processes, time and peak RSS),
:mod:`.metrics`, :mod:`.table`, :mod:`.bench` (the loop).
"""
