"""Fundus datasets (sources/), preprocessing, splits and the Lightning data module."""
