"""The fitting engine: encodings, fields, presets, MI stopping and ``fit.fit_contrasts``."""
