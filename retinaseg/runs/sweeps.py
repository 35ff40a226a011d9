"""Hydra multiruns: failing jobs reported with their overrides, a summary naming the best job, cross-validation
folds pooled, the checkpoint x dataset table of an evaluation sweep, DDP inside a job.

`SweepSummary` and `EvalSweepSummary` are Hydra callbacks (conf/hydra/default.yaml, conf/hydra/eval.yaml);
retinaseg.train calls `relaunch_ranks_as_this_job`.
"""

import atexit
import copy
import csv
import functools
import io
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, read_write

from retinaseg.core.safe_io import write_text
from retinaseg.evaluation.counts import REPORTED
from retinaseg.evaluation.scoring import ImageCounts
from retinaseg.runs.rundir import RunDir

log = logging.getLogger(__name__)

# The sweep's summary, in the sweep directory (each job's record, in its own: RunDir.job_record).
SUMMARY_FILE = "sweep_summary.yaml"
# The table of an evaluation sweep, in its directory.
EVAL_TABLE = "eval_summary"
EVAL_COLUMNS = ("checkpoint", "dataset", "split", "n_images", "fov", "f1", "auc", "sensitivity", "specificity")


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


def cross_validation(jobs: list[dict]) -> list[dict]:
    """The test metrics of each cross-validation among `jobs` (those with a `fold`; one per set of other overrides):
    pooled over all its folds' test pixels (each image scored by the model that never saw it), and the mean and
    sd (n - 1) over folds of each fold's own test metrics."""
    groups: dict[tuple, list[dict]] = {}
    for job in jobs:
        if job.get("fold") is not None:
            others = tuple(o for o in job["overrides"] if not o.startswith("data.fold="))
            groups.setdefault(others, []).append(job)
    results = []
    for others, group in groups.items():
        done = [j for j in group if j["status"] == "COMPLETED" and RunDir(j["dir"]).test_counts.histograms.is_file()]
        result = {"overrides": list(others), "folds": group[0]["folds"], "folds_done": sorted(j["fold"] for j in done)}
        if done:
            counts = (RunDir(j["dir"]).test_counts.read_counts("fold") for j in done)
            per_fold = [json.loads(RunDir(j["dir"]).metrics.read_text()) for j in done]
            result["pooled"] = functools.reduce(ImageCounts.concatenate, counts).total()
            result["mean"] = {k: float(np.mean([m[k] for m in per_fold])) for k in REPORTED}
            result["sd"] = {
                k: float(np.std([m[k] for m in per_fold], ddof=1)) if len(done) > 1 else None for k in REPORTED
            }
        results.append(result)
    return results


class SweepSummary(Callback):
    """Logs each failing job of a multirun with its overrides, and keeps `<sweep dir>/sweep_summary.yaml`: every
    job's number, overrides, directory, status and value of `optimized_metric`, the best job by `direction`, and
    for cross-validation jobs (data.folds set) their folds pooled (`cross_validation`).

    Each job leaves its record in its own directory (`sweep_job.yaml`) and the summary is gathered from those,
    so it is complete whichever launcher ran the jobs (here, or on SLURM nodes) and even if the sweep stops early.
    """

    def __init__(self, direction: str = "maximize"):
        if direction not in ("maximize", "minimize"):
            raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
        self.direction = direction
        self.reported = False

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # When a job failed, Hydra's sweeper raises its error at the end of the sweep, and on_multirun_end is not
        # called: the sweep's results are then logged as the process exits.
        if rank_zero_only.rank == 0:
            atexit.register(self.report, config)

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
        if OmegaConf.select(config, "data.folds"):
            record["folds"], record["fold"] = config.data.folds, config.data.fold or 0  # null: fold 0
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
        write_text(RunDir(record["dir"]).job_record, yaml.safe_dump(record, sort_keys=False))
        self.write_summary(Path(config.hydra.sweep.dir), OmegaConf.select(config, "optimized_metric"))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self.report(config)

    def report(self, config: DictConfig) -> None:
        """Log the cross-validation results and the best job of the sweep (once)."""
        if self.reported:
            return
        self.reported = True
        summary = self.write_summary(Path(config.hydra.sweep.dir), OmegaConf.select(config, "optimized_metric"))
        for result in summary.get("cross_validation", []):
            if "pooled" in result:
                pooled, mean, sd = result["pooled"], result["mean"], result["sd"]
                log.info(
                    "cross-validation, folds %s of %d: pooled over their test pixels F1 %.4f AUC %.4f; "
                    "mean over folds F1 %.4f (sd %s) AUC %.4f (sd %s)",
                    result["folds_done"],
                    result["folds"],
                    pooled["f1"],
                    pooled["auc"],
                    mean["f1"],
                    "-" if sd["f1"] is None else f"{sd['f1']:.4f}",
                    mean["auc"],
                    "-" if sd["auc"] is None else f"{sd['auc']:.4f}",
                )
        best = summary["best"]
        if summary["optimized_metric"] is None:
            return
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
            (yaml.safe_load(path.read_text()) for path in sweep_dir.rglob(RunDir(sweep_dir).job_record.name)),
            key=lambda job: job["job"],
        )
        scored = [job for job in jobs if job.get("value") is not None and math.isfinite(job["value"])]
        pick = max if self.direction == "maximize" else min
        summary = {
            "optimized_metric": metric,
            "direction": self.direction,
            "best": copy.deepcopy(pick(scored, key=lambda job: job["value"])) if scored else None,  # no YAML alias
            "jobs": jobs,
        }
        pooled = cross_validation(jobs)
        if pooled:
            summary["cross_validation"] = pooled
        # Jobs finishing together (on several nodes) never leave a torn file.
        write_text(sweep_dir / SUMMARY_FILE, yaml.safe_dump(summary, sort_keys=False))
        return summary


class EvalSweepSummary(SweepSummary):
    """SweepSummary for `python -m retinaseg.eval -m ckpt_path=a.ckpt,b.ckpt data=drive,stare`: also writes
    `eval_summary.md` and `eval_summary.csv` into the sweep directory, one row per checkpoint x dataset (from
    each job's metrics.json): F1, AUC, sensitivity and specificity pooled over the FOV pixels of the split. The
    jobs that failed are listed under the table, with their overrides and error."""

    def write_summary(self, sweep_dir: Path, metric: str | None) -> dict:
        summary = super().write_summary(sweep_dir, metric)
        rows = []
        for job in summary["jobs"]:
            path = RunDir(job["dir"]).metrics
            if job["status"] == "COMPLETED" and path.is_file():
                metrics = json.loads(path.read_text())
                rows.append({key: metrics.get(key) for key in EVAL_COLUMNS})
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=EVAL_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text(sweep_dir / f"{EVAL_TABLE}.csv", text.getvalue())
        lines = ["| " + " | ".join(EVAL_COLUMNS) + " |", "|" + " --- |" * len(EVAL_COLUMNS)]
        for row in rows:
            cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()]
            lines.append("| " + " | ".join(cells) + " |")
        failed = [job for job in summary["jobs"] if job["status"] != "COMPLETED"]
        if failed:
            lines += ["", f"{len(failed)} job(s) failed, not in the table:", ""]
            lines += [f"- #{job['job']} ({' '.join(job['overrides'])}): {job.get('error')}" for job in failed]
        write_text(sweep_dir / f"{EVAL_TABLE}.md", "\n".join(lines) + "\n")
        return summary
