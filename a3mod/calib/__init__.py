"""Calibration: token windows from text sources (sources.py), the statistics a pass reads (stats.py) and
data-parallel sums over ranks (distributed.py)."""
