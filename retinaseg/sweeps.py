"""Hydra multiruns: failing jobs reported with their overrides, a summary naming the best job, DDP inside a job.

`SweepSummary` is a Hydra callback (conf/hydra/default.yaml); retinaseg.train calls `relaunch_ranks_as_this_job`.
"""

import copy
import logging
import math
import sys
from pathlib import Path

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, read_write

from retinaseg.runs.safe_io import write_text

log = logging.getLogger(__name__)

# Each job's record, in its own directory, and the sweep's summary, in the sweep directory.
JOB_FILE = "sweep_job.yaml"
SUMMARY_FILE = "sweep_summary.yaml"


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def relaunch_ranks_as_this_job() -> None:
    """Make Lightning start the other DDP processes of a multirun job as this one job.

    Lightning starts ranks > 0 by running the command line again with `hydra.run.dir=<this run dir>`. In a
    multirun that command line is the whole sweep (`-m a=1,2`): every rank would run all jobs again, in new
    directories. The job's own overrides, in run mode, into the job's directory, start exactly this job.
    """
    if not in_multirun():
        return
    hydra_cfg = HydraConfig.get()
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


class SweepSummary(Callback):
    """Logs each failing job of a multirun with its overrides, and keeps `<sweep dir>/sweep_summary.yaml`: every
    job's number, overrides, directory, status and value of `optimized_metric`, and the best job by `direction`.

    Each job leaves its record in its own directory (`sweep_job.yaml`) and the summary is gathered from those,
    so it is complete whichever launcher ran the jobs (here, or on SLURM nodes) and even if the sweep stops early.
    """

    def __init__(self, direction: str = "maximize"):
        if direction not in ("maximize", "minimize"):
            raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
        self.direction = direction

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        # Only multirun jobs, once each (DDP processes of a job started by SLURM all run it).
        if config.hydra.mode != RunMode.MULTIRUN or rank_zero_only.rank != 0:
            return
        record = {
            "job": config.hydra.job.num,
            "status": job_return.status.name,
            "overrides": list(job_return.overrides),
            "dir": config.hydra.runtime.output_dir,
        }
        if job_return.status == JobStatus.COMPLETED:
            value = job_return.return_value
            record["value"] = None if value is None else float(value)
        else:
            try:
                _ = job_return.return_value  # raises the job's exception
            except BaseException as error:
                while error.__cause__ is not None:  # the error itself, not Hydra's wrapping of it
                    error = error.__cause__
                record["error"] = f"{type(error).__name__}: {error}"
            log.error(
                "job #%s failed (overrides: %s): %s", record["job"], " ".join(record["overrides"]), record.get("error")
            )
        write_text(Path(record["dir"], JOB_FILE), yaml.safe_dump(record, sort_keys=False))
        self.write_summary(Path(config.hydra.sweep.dir), config.optimized_metric)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        summary = self.write_summary(Path(config.hydra.sweep.dir), config.optimized_metric)
        best = summary["best"]
        if best is None:
            log.warning(
                "no job of the sweep returned %s; see %s",
                config.optimized_metric,
                Path(config.hydra.sweep.dir) / SUMMARY_FILE,
            )
        else:
            log.info(
                "best job: #%s, %s=%.4f, overrides: %s, in %s",
                best["job"],
                config.optimized_metric,
                best["value"],
                " ".join(best["overrides"]),
                best["dir"],
            )

    def write_summary(self, sweep_dir: Path, metric: str) -> dict:
        jobs = sorted(
            (yaml.safe_load(path.read_text()) for path in sweep_dir.rglob(JOB_FILE)), key=lambda job: job["job"]
        )
        scored = [job for job in jobs if job.get("value") is not None and math.isfinite(job["value"])]
        pick = max if self.direction == "maximize" else min
        summary = {
            "optimized_metric": metric,
            "direction": self.direction,
            "best": copy.deepcopy(pick(scored, key=lambda job: job["value"])) if scored else None,  # no YAML alias
            "jobs": jobs,
        }
        # Jobs finishing together (on several nodes) never leave a torn file.
        write_text(sweep_dir / SUMMARY_FILE, yaml.safe_dump(summary, sort_keys=False))
        return summary
