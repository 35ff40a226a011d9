"""A training run: its directory, resume, time budget, sweeps, the callbacks of its lifecycle, speed timing."""
