"""What every entry point sets up before Hydra composes its config (the OmegaConf resolvers the configs use,
and a console without known noise), and how it builds the objects of a composed group. Nothing happens on
import; entry points (and tests) call `setup()`."""

import logging
import warnings

import hydra
from omegaconf import DictConfig, OmegaConf

from retinaseg.core.machine import fastest_precision


def if_resuming(resume, resuming, otherwise):
    """`${if_resuming:${resume},a,b}`: a when `resume=<run dir>` is given, else b (conf/hydra/train.yaml)."""
    return resuming if resume else otherwise


RESOLVERS = {"fastest_precision": fastest_precision, "if_resuming": if_resuming}


class _DropTips(logging.Filter):
    """Drops Lightning's advertisements ("💡 Tip: ... try installing litlogger / litmodels ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_known_noise() -> None:
    """Silence messages that say nothing about the run, each matched narrowly where it is raised."""
    # Lightning 2.6 calls torch's deprecated LeafSpec() in its own pytree helper on every logged metric, and
    # torch's ONNX exporter (retinaseg.export) in torch's own pytree code, raised through copyreg; nothing to act
    # on until they change it.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"(lightning\.pytorch\.utilities\._pytree|copyreg)$",
    )
    # torch's ONNX exporter: an INFO line per folded constant or slice of unknown size (onnx_ir, onnxscript) and
    # a warning per torchvision operator it skips registering (this project has no torchvision).
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    # With bf16-mixed the model summary's size estimate assumes 32 bits; only that estimate is affected.
    warnings.filterwarnings(
        "ignore",
        message="Precision bf16-mixed is not supported by the model summary",
        category=UserWarning,
        module="lightning.pytorch.utilities.model_summary.model_summary",
    )
    # A resumed run's checkpoint directory is not empty, by design; run directories are never shared otherwise
    # (retinaseg.runs.rundir), so the warning says nothing.
    warnings.filterwarnings(
        "ignore",
        message=r"Checkpoint directory .* exists and is not empty",
        category=UserWarning,
        module="lightning.pytorch.callbacks.model_checkpoint",
    )
    # Lightning logs its tips through rank_zero_info, whose logger is one of these (which one depends on the
    # order Lightning's packages were imported in).
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())


def setup() -> None:
    """Register the resolvers (once) and quiet the console."""
    for name, resolver in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
    quiet_known_noise()


def instantiate_group(group: DictConfig | None, **extra: dict) -> list:
    """Objects of a config group whose entries are each a `_target_` (callbacks, loggers); `extra[<entry>]`: more
    arguments for that entry."""
    return [
        hydra.utils.instantiate(c, **extra.get(name, {}), _convert_="all")
        for name, c in (group or {}).items()
        if c and "_target_" in c
    ]
