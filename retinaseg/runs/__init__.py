"""A run's directory: its files (rundir), writing them safely (safe_io), continuing a run (resume), its CSV log."""
