"""Running an entry point as a user would, in a subprocess, and reading the errors it printed."""

import os
import subprocess
import sys
from pathlib import Path


def run_entry_point(name: str, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`python -m retinaseg.<name> <args>` in `cwd`, as a user would type it; output captured."""
    return subprocess.run(
        [sys.executable, "-m", f"retinaseg.{name}", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
    )


def run_module(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`python -m retinaseg.train <args>`."""
    return run_entry_point("train", args, cwd, **env)


def error_lines(stderr: str) -> list[str]:
    """The `error: ...` lines an entry point printed."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]
