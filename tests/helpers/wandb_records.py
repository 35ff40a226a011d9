"""Reading back what an offline W&B run recorded, from its `.wandb` file."""

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from wandb.proto import wandb_internal_pb2


def wandb_records(path: Path) -> list:
    """The records of an offline run's `.wandb` file: W&B's own protobuf `Record`s, in LevelDB's log format (32 KiB
    blocks of chunks, each with a 7-byte header: crc32, length, type; type 1 is a whole record, 2-4 its
    first/middle/last part). wandb 0.31 ships no reader of its own for these files."""
    data, block, pos = path.read_bytes(), 32768, 7  # after the file header
    records, parts = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
        elif kind == 0:  # zero padding at the end of a block
            parts = b""
    return records


def _items(items) -> dict:
    """Config, summary or history items by key (a nested key's parts joined by `/`), their values parsed."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


@dataclass
class WandbRun:
    """What one offline W&B run recorded: its run record (run_id, display_name, run_group, job_type, project,
    tags), its config (given at start and updated), its final summary, its history rows, all its records, and
    the path of its `.wandb` file."""

    run: object
    config: dict
    summary: dict
    history: list[dict]
    records: list
    path: Path

    @property
    def files(self) -> Path:
        """The run's files folder (images, tables)."""
        return self.path.parent / "files"


def wandb_run(path: Path) -> WandbRun:
    """The offline run whose `.wandb` file is `path`."""
    records = wandb_records(path)
    (run,) = [r.run for r in records if r.HasField("run")]
    config = _items(run.config.update)
    summary: dict = {}
    for r in records:
        if r.HasField("config"):
            config.update(_items(r.config.update))
        elif r.HasField("summary"):  # each record updates some keys; the last value of each is the summary's
            summary.update(_items(r.summary.update))
    history = [_items(r.history.item) for r in records if r.HasField("history")]
    return WandbRun(run, config, summary, history, records, path)


def wandb_runs(directory: Path) -> list[WandbRun]:
    """Every offline W&B run under `directory` (a run directory, or a sweep's), by path."""
    return [wandb_run(path) for path in sorted(directory.rglob("offline-run-*/run-*.wandb"))]
