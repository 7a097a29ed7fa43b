"""HTML quality-control reports: per participant/session and for the group.

:mod:`.participant` writes ``sub-<L>[_ses-<S>].html``, :mod:`.group` writes
``group_report.html``; :mod:`.figures` draws the panels (matplotlib, Agg).
"""
