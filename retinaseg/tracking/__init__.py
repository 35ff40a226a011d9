"""Weights & Biases: run names and groups, the logger and its offline fallback, callbacks, reports."""
