"""A run's directory: the files a run leaves in it, which task's run it holds, and who may write into it.

The rules (docs/troubleshooting.md, "Run directories"), enforced by `ClaimRunDirectory` before Hydra writes anything there:
- a directory holds one run: a run of any task refuses a directory that already holds one (in it or in a folder
  below it: an earlier sweep's jobs too), and one inside another run's directory (eval or predict never write
  into a training run); only `resume=<dir>` continues a training run in its own directory;
- a multirun claims its sweep directory so, and each of its jobs its own directory;
- one process at a time: a run holds the lock file `run.lock` (created exclusively) while it runs;
- predict's output_dir is never the folder of its input photographs or FOV masks;
- a run that ends without finishing and wrote nothing but Hydra's record of it (.hydra/, its log) leaves
  nothing behind, so running it again is not refused.
"""

import atexit
import contextlib
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from retinaseg.core.errors import ConfigError, exit_on_user_error
from retinaseg.evaluation.directory import EvaluationDirectory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunDir:
    """The files of one run directory (conf/callbacks and conf/logger write them where these say)."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last(self) -> Path:
        """The checkpoint written after every epoch (and on SIGTERM): what a resumed run continues from."""
        return self.checkpoints / "last.ckpt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.ckpt"

    @property
    def metrics_csv(self) -> Path:
        return self.path / "csv" / "metrics.csv"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def test_counts(self) -> EvaluationDirectory:
        """The test images' counts a cross-validation sweep pools (retinaseg.runs.callbacks.CountTestImages): its
        per_image.csv and histograms.npz, as an evaluation keeps them."""
        return EvaluationDirectory(self.path)

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def budget(self) -> Path:
        """With budget: the calibration and the step count it chose (retinaseg.runs.budget)."""
        return self.path / "budget.json"

    @property
    def config(self) -> Path:
        """Hydra's record of the composed config of the run that started here."""
        return self.path / ".hydra" / "config.yaml"

    @property
    def sweep_config(self) -> Path:
        """Hydra's record of the composed config of the multirun whose sweep directory this is."""
        return self.path / "multirun.yaml"

    @property
    def job_record(self) -> Path:
        """A multirun job's record (retinaseg.runs.sweeps): its number, overrides and status."""
        return self.path / "sweep_job.yaml"

    @property
    def lock(self) -> Path:
        return self.path / "run.lock"

    def last_to_resume(self) -> Path:
        """last.ckpt, which `resume=<this directory>` continues from; a ConfigError when there is none."""
        if not self.last.is_file():
            raise ConfigError(
                f"resume={self.path}: nothing to resume, {self.last} does not exist (a run writes it at the end of "
                "its first epoch). Pass the directory of a run that has one, or start a new run without resume."
            )
        return self.last

    def results(self) -> Path | None:
        """The first file a run or a multirun job leaves here besides Hydra's record of it, or None."""
        candidates = [
            *sorted(self.checkpoints.glob("*.ckpt")),
            self.metrics_csv,
            self.metrics,
            self.test_counts.histograms,
            self.job_record,
        ]
        return next((p for p in candidates if p.is_file()), None)

    def earlier_run(self) -> tuple["RunDir", Path] | None:
        """(where, file): the first run or multirun found here or in a folder below, and a file that shows it."""
        if not self.path.is_dir():
            return None
        for folder, subfolders, _ in os.walk(self.path):  # os.walk follows no symbolic link: no cycle
            subfolders.sort()
            run = RunDir(folder)
            found = next((p for p in (run.config, run.sweep_config) if p.is_file()), None) or run.results()
            if found is not None:
                return run, found
        return None

    def task(self) -> str | None:
        """The task (train, eval, predict, benchmark) of the run or multirun recorded here, or None."""
        for record in (self.config, self.sweep_config):
            try:
                return (yaml.safe_load(record.read_text()) or {}).get("task_name")
            except (OSError, yaml.YAMLError, AttributeError):
                continue
        return None

    def enclosing_run(self) -> "RunDir | None":
        """The nearest directory above this one where a run was started (it has .hydra/config.yaml), or None."""
        return next((RunDir(p) for p in self.path.resolve().parents if RunDir(p).config.is_file()), None)

    def claim(
        self,
        task: str,
        resume: bool = False,
        keep_apart: dict[str, str] | None = None,
        setting: str = "hydra.run.dir",
    ) -> "RunLock":
        """Check that a run of `task` may write here (see the module's rules) and lock the directory for it.

        `setting` names the setting that chose this directory, in the messages (hydra.sweep.dir for a multirun,
        predict's output_dir)."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"run directory {self.path} is a file: {setting} needs a folder. Choose another path.")
        enclosing = self.enclosing_run()
        if enclosing is not None:
            raise ConfigError(
                f"run directory {self.path} is inside the {enclosing.task() or 'earlier'} run {enclosing.path}, which "
                f"{task} does not write into. Choose another {setting} outside it (without it a new directory is made)."
            )
        for name, value in (keep_apart or {}).items():
            given = Path(value).expanduser().resolve()
            folder = given if given.is_dir() else given.parent
            if folder == self.path.resolve():
                raise ConfigError(
                    f"output_dir={self.path} is the folder of {name}={value}: its outputs would be mixed with (and "
                    "could overwrite) the files read. Choose another output_dir."
                )
        earlier = self.earlier_run()
        if resume:
            self.last_to_resume()
        elif earlier is not None:
            run, file = earlier
            what = run.task()
            resumable = task == "train" and run == self and self.last.is_file()
            how = f"Continue it with resume={self.path}, or choose" if resumable else "Choose"
            raise ConfigError(
                f"run directory {self.path} already holds {_article(what or 'earlier')} run ({file}); "
                f"{task} does not write over it. {how} another {setting} (without it a new directory is made)."
            )
        return RunLock.acquire(self.lock, setting)

    def claim_job(self, sweep: "RunDir") -> "RunLock | None":
        """Check that a job of a multirun whose sweep directory `sweep` was claimed may write here, and lock the
        directory for it (None: it is the sweep directory itself, locked already). Hydra has written its record
        of the job here already; a job of the same sweep that ran here before (two jobs given one directory by
        hydra.sweep.subdir) left its results."""
        earlier = self.results()
        if earlier is not None:
            raise ConfigError(
                f"job directory {self.path} already holds an earlier job's results ({earlier}): the sweep's jobs "
                "must each have their own directory. Choose a hydra.sweep.subdir that differs between jobs (by "
                "default their numbers)."
            )
        return None if self.path.resolve() == sweep.path.resolve() else RunLock.acquire(self.lock, "hydra.sweep.dir")


@dataclass(frozen=True)
class RunLock:
    """`run.lock`: created exclusively by the process that runs in the directory, removed when it ends.

    A lock left by a process that died (SIGKILL) on this machine is taken over; one of a process that
    still runs, or of another machine, refuses the directory.
    """

    path: Path

    @classmethod
    def acquire(cls, path: Path, setting: str = "hydra.run.dir") -> "RunLock":
        mine = f"{os.getpid()} {socket.gethostname()}\n"
        for _ in range(2):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(path)
                if not _is_stale(holder):
                    pid, host = (holder.split() + ["?", "?"])[:2]
                    raise ConfigError(
                        f"run directory {path.parent} is in use by process {pid} on {host} (its lock file {path}): "
                        f"wait for that run to end, or choose another {setting}. If no such process runs, "
                        "remove the lock file."
                    ) from None
                log.info("taking over %s, left by process %s, which no longer runs", path, holder.split()[0])
                path.unlink(missing_ok=True)
                continue
            except OSError as error:
                raise ConfigError(
                    f"cannot create {path}: {error.strerror or error}. Choose another directory."
                ) from None
            with os.fdopen(descriptor, "w") as file:
                file.write(mine)
            return cls(path)
        raise ConfigError(f"cannot lock run directory {path.parent}: another process keeps taking {path}.")

    def release(self) -> None:
        """Remove the lock, if it is still this process's."""
        if _read(self.path).split()[:1] == [str(os.getpid())]:
            self.path.unlink(missing_ok=True)


def _article(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _is_stale(holder: str) -> bool:
    """True when the lock's process ran on this machine and has ended."""
    fields = holder.split()
    if len(fields) != 2 or not fields[0].isdigit() or fields[1] != socket.gethostname():
        return False
    try:
        os.kill(int(fields[0]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it runs, as another user
        return False
    return False


class ClaimRunDirectory(HydraCallback):
    """Hydra callback: `RunDir.claim` on `hydra.run.dir` before Hydra writes its .hydra/ and log there; in a
    multirun, on `hydra.sweep.dir` before the sweeper writes there, then `RunDir.claim_job` on each job's directory.

    `keep_apart`: config keys naming input files or folders whose folder must not be the run directory
    (predict's input and fov). `setting`: the setting that chooses the run directory, named in messages
    (predict's output_dir). Locks are released when the job ends, or the process exits; a run that did not
    finish and left nothing but Hydra's record is removed then (`forget_unfinished_run`).
    """

    def __init__(self, keep_apart: list[str] | None = None, setting: str = "hydra.run.dir"):
        self.keep_apart = list(keep_apart or [])
        self.setting = setting
        self.finished = False
        self.job_lock: RunLock | None = None

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        # The other processes of a DDP run, started by Lightning in rank 0's directory, join its run.
        if rank_zero_only.rank != 0:
            return
        run = RunDir(config.hydra.run.dir)
        # Hydra's record of the run: its log (hydra/job_logging's file) and .hydra/ (hydra.output_subdir).
        record = [run.path / f"{OmegaConf.select(config, 'hydra.job.name', default=config.task_name)}.log"]
        if OmegaConf.select(config, "hydra.output_subdir") is not None:
            record.append(run.path / config.hydra.output_subdir)
        created = [p for p in [run.path, *record] if not p.exists()]
        before = set(run.path.iterdir()) if run.path.is_dir() else set()
        resume = bool(config.get("resume"))
        inputs = {key: str(config[key]) for key in self.keep_apart if config.get(key)}
        with exit_on_user_error():
            lock = run.claim(config.task_name, resume, inputs, self.setting)

        def end() -> None:
            # A resumed run's directory holds the run it continues: it is kept, whatever happened.
            if not self.finished and not resume:
                forget_unfinished_run(run, before, created, lock)
            lock.release()

        atexit.register(end)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if rank_zero_only.rank != 0:
            return
        with exit_on_user_error():
            lock = RunDir(config.hydra.sweep.dir).claim(config.task_name, setting="hydra.sweep.dir")
        atexit.register(lock.release)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        # In a multirun only (a run's directory was claimed by on_run_start); once per job (DDP processes
        # started by SLURM all run it).
        if config.hydra.mode != RunMode.MULTIRUN or rank_zero_only.rank != 0:
            return
        with exit_on_user_error():
            self.job_lock = RunDir(config.hydra.runtime.output_dir).claim_job(RunDir(config.hydra.sweep.dir))
        if self.job_lock is not None:
            atexit.register(self.job_lock.release)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        self.finished = job_return.status == JobStatus.COMPLETED
        if self.job_lock is not None:
            self.job_lock.release()
            self.job_lock = None


def forget_unfinished_run(run: RunDir, before: set[Path], created: list[Path], lock: RunLock) -> None:
    """Remove `created` (the run directory, if it was new, and Hydra's record of the run: .hydra/, its log) when
    nothing else was added to the directory since `before`: the run stopped before it wrote any result, and a new
    run (the same command, corrected) may have the directory."""
    added = {p for p in run.path.iterdir() if p not in before and p != lock.path} if run.path.is_dir() else set()
    if not added <= set(created):
        return
    for path in created:
        if path.is_dir() and path != run.path:
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file():
            path.unlink(missing_ok=True)
    lock.release()
    if run.path in created:
        with contextlib.suppress(OSError):  # not empty: another process has it now
            run.path.rmdir()
