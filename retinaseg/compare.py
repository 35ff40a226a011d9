"""`python -m retinaseg.compare a=<eval dir> b=<eval dir>`: is b better than a on the same images?
`python -m retinaseg.compare a=<eval dir> literature=true [train=<eval dir>]`: a beside published results, each
scored the way its paper scored (retinaseg.evaluation.literature: literature.md, literature.csv).

For each metric: a, b, b - a, the paired-bootstrap 95% interval of b - a and the two-sided p-value of a paired
permutation test (retinaseg.evaluation.stats.paired_comparison), recomputed without the models from what each evaluation
wrote: metrics.json, per_image.csv (per-image counts) and histograms.npz. Writes comparison.json and
comparison.md into its run directory and prints the table.
"""

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from retinaseg.core import config
from retinaseg.core.errors import ConfigError, DataError, check_bool, check_int, exit_on_user_error
from retinaseg.core.safe_io import write_text
from retinaseg.evaluation import comparison, literature, stats
from retinaseg.evaluation.directory import Evaluation, EvaluationDirectory
from retinaseg.runs.rundir import RunDir

config.setup()
log = logging.getLogger(__name__)


def read_evaluation(directory: str | None, name: str) -> Evaluation:
    """The evaluation in `directory` (argument `name`), refused where the directory holds another kind of run."""
    if directory is None:
        raise ConfigError(
            f"{name}=<eval dir> is missing: pass the run directories of two retinaseg.eval runs, a=... b=..."
        )
    path = Path(directory).expanduser()
    run = RunDir(path)
    task = run.task()
    if run.sweep_config.is_file():
        raise DataError(
            f"{name}={directory} is the sweep directory of a multirun: pass the directory of one of its evaluations "
            f"(its numbered folders, e.g. {path / '0'})"
        )
    if task not in (None, "eval"):
        raise DataError(
            f"{name}={directory} is a {task} run, not an evaluation: evaluate its checkpoint with `python -m "
            "retinaseg.eval ckpt_path=<file.ckpt>` and pass that run's directory"
        )
    if task == "eval" and not run.metrics.is_file():
        raise DataError(
            f"{name}={directory}: its evaluation did not finish (metrics.json, written last, is missing): "
            "evaluate its checkpoint again"
        )
    return EvaluationDirectory(path).read(name)


def compare(cfg: DictConfig) -> dict:
    """Compare evaluation b with evaluation a; write comparison.json and comparison.md; return the former's content."""
    stats.check_resamples("bootstrap", cfg.bootstrap)
    check_int("seed", cfg.seed)
    check_bool("allow_different_images", cfg.allow_different_images)
    check_bool("allow_different_thresholds", cfg.allow_different_thresholds)
    a, b = read_evaluation(cfg.a, "a"), read_evaluation(cfg.b, "b")
    result = comparison.compare(
        a, b, cfg.bootstrap, cfg.seed, cfg.allow_different_images, cfg.allow_different_thresholds
    )
    output_dir = Path(cfg.paths.output_dir)
    write_text(output_dir / "comparison.json", json.dumps(result, indent=2) + "\n")
    report = comparison.markdown(result)
    write_text(output_dir / "comparison.md", report)
    print(report, end="")
    log.info("comparison written to %s", output_dir)
    return result


def compare_with_literature(cfg: DictConfig) -> list[literature.Row]:
    """`literature=true`: evaluation a beside the published results on its dataset (retinaseg.evaluation.literature)."""
    check_int("bootstrap", cfg.bootstrap, minimum=0)
    check_int("seed", cfg.seed)
    if cfg.a is None:
        raise ConfigError(
            "a=<eval dir> is missing: pass the run directory of the retinaseg.eval run to set beside the literature"
        )
    directories = (cfg.a, cfg.get("train"), cfg.get("val"))
    return literature.report(*directories, Path(cfg.paths.output_dir), cfg.bootstrap, cfg.seed)


@hydra.main(version_base="1.3", config_path="conf", config_name="compare")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        check_bool("literature", cfg.literature)
        if cfg.literature:
            compare_with_literature(cfg)
        else:
            compare(cfg)


if __name__ == "__main__":
    main()
