"""Scoring vessel maps: counts inside the FOV, topology, pooled scores and intervals, thresholds, the evaluation directory."""
