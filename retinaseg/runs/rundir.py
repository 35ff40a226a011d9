"""A run's directory: the files a run leaves in it, which task's run it holds, and who may write into it.

The rules (docs/troubleshooting.md, "Run directories"), enforced by `ClaimRunDirectory` before Hydra writes anything there:
- a directory holds one run: a run of any task refuses a directory that already holds one, and one inside
  another run's directory (eval or predict never write into a training run); only `resume=<dir>` continues
  a training run in its own directory;
- one process at a time: a run holds the lock file `run.lock` (created exclusively) while it runs;
- predict's output_dir is never the folder of its input photographs or FOV masks.
"""

import atexit
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback as HydraCallback
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from retinaseg.errors import ConfigError, exit_on_user_error

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
    def test_counts(self) -> Path:
        """The test images' counts a cross-validation sweep pools (retinaseg.callbacks.CountTestImages)."""
        return self.path / "test_counts.npz"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def budget(self) -> Path:
        """With trainer.budget: the calibration and the step count it chose (retinaseg.budget)."""
        return self.path / "budget.json"

    @property
    def config(self) -> Path:
        """Hydra's record of the composed config of the run that started here."""
        return self.path / ".hydra" / "config.yaml"

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

    def earlier_run(self) -> Path | None:
        """The first file that shows a run was started here, or None."""
        candidates = [self.config, *sorted(self.checkpoints.glob("*.ckpt")), self.metrics_csv, self.metrics]
        return next((p for p in candidates if p.is_file()), None)

    def task(self) -> str | None:
        """The task (train, eval, predict, benchmark) of the run recorded here, or None."""
        try:
            return (yaml.safe_load(self.config.read_text()) or {}).get("task_name")
        except (OSError, yaml.YAMLError, AttributeError):
            return None

    def enclosing_run(self) -> "RunDir | None":
        """The nearest directory above this one where a run was started (it has .hydra/config.yaml), or None."""
        return next((RunDir(p) for p in self.path.resolve().parents if RunDir(p).config.is_file()), None)

    def claim(self, task: str, resume: bool = False, keep_apart: dict[str, str] | None = None) -> "RunLock":
        """Check that a run of `task` may write here (see the module's rules) and lock the directory for it."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(
                f"run directory {self.path} is a file: a run needs a folder there (hydra.run.dir, or predict's "
                "output_dir). Choose another path."
            )
        enclosing = self.enclosing_run()
        if enclosing is not None:
            raise ConfigError(
                f"run directory {self.path} is inside the {enclosing.task() or 'earlier'} run {enclosing.path}, which "
                f"{task} does not write into. Choose a directory outside it (without hydra.run.dir a new one is made)."
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
            what = self.task()
            resumable = task == "train" and self.last.is_file()
            how = f"Continue it with resume={self.path}, or choose" if resumable else "Choose"
            raise ConfigError(
                f"run directory {self.path} already holds {f'a {what}' if what else 'an earlier'} run ({earlier}); "
                f"{task} does not write over it. {how} another hydra.run.dir (without it a new directory is made)."
            )
        return RunLock.acquire(self.lock)


@dataclass(frozen=True)
class RunLock:
    """`run.lock`: created exclusively by the process that runs in the directory, removed when it ends.

    A lock left by a process that died (SIGKILL) on this machine is taken over; one of a process that
    still runs, or of another machine, refuses the directory.
    """

    path: Path

    @classmethod
    def acquire(cls, path: Path) -> "RunLock":
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
                        "wait for that run to end, or choose another hydra.run.dir. If no such process runs, "
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
    """Hydra callback: `RunDir.claim` on `hydra.run.dir` before Hydra writes its .hydra/ and log there.

    `keep_apart`: config keys naming input files or folders whose folder must not be the run directory
    (predict's input and fov). The lock is released when the process exits.
    """

    def __init__(self, keep_apart: list[str] | None = None):
        self.keep_apart = list(keep_apart or [])

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        # The other processes of a DDP run, started by Lightning in rank 0's directory, join its run.
        if rank_zero_only.rank != 0:
            return
        inputs = {key: str(config[key]) for key in self.keep_apart if config.get(key)}
        with exit_on_user_error():
            lock = RunDir(config.hydra.run.dir).claim(config.task_name, bool(config.get("resume")), inputs)
        atexit.register(lock.release)
