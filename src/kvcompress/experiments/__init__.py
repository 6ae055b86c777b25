"""Experiments over many specs: `sweep` (one JSON record per spec, resumable), `analysis` (the
breaking-point analysis: a default sweep plus its report) and `report` (tables and plots from
the records). This package measures through `measure` and never changes the core.
"""
