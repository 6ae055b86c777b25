"""Choosing specs by measurement: per-layer tuning to a quality target (`tune`) and the
measured presets (`preset_selection`). Selection reads only selection text; figures that are
reported come from text it never read.
"""
