"""`python -m retinaseg.results`: the reference results, kept as one record per result in docs/results/records/.

action=render writes the tables of docs/results.md and README.md from the records, action=check fails (exit
status 1) where those pages and the records disagree, and action=add writes a record from an evaluation
directory (its metrics.json with the 95% intervals) and the training run of its checkpoint (steps, wall time).
"""

import logging
import sys
from dataclasses import asdict
from pathlib import Path

import hydra
import yaml
from omegaconf import DictConfig

from retinaseg.core.errors import check_choice, exit_on_user_error
from retinaseg.core.safe_io import write_text
from retinaseg.evaluation.records import Record, load_records, record_of, rendered

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "docs" / "results" / "records"
# The pages whose generated tables are rewritten: page -> the roles its table shows.
PAGES = {ROOT / "docs" / "results.md": ("reference", "best"), ROOT / "README.md": ("reference",)}


def stale_pages(records: list[Record]) -> list[Path]:
    return [page for page, roles in PAGES.items() if page.read_text() != rendered(page.read_text(), records, roles)]


def add(cfg: DictConfig) -> Path:
    eval_dir = Path(cfg.eval_dir or "").expanduser()
    record = record_of(eval_dir, cfg.name, cfg.title, cfg.role, cfg.scorer, cfg.version, cfg.machine)
    path = RECORDS / f"{record.name}.yaml"
    write_text(
        path, yaml.safe_dump(asdict(record), sort_keys=False, allow_unicode=True, width=200, default_flow_style=None)
    )
    log.info("wrote %s: render the pages with `python -m retinaseg.results`", path)
    return path


@hydra.main(version_base="1.3", config_path="conf", config_name="results")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with exit_on_user_error():
        check_choice("action", cfg.action, ("render", "check", "add"))
        if cfg.action == "add":
            add(cfg)
        records = load_records(RECORDS)
        if cfg.action == "check":
            stale = stale_pages(records)
            for page in stale:
                print(f"{page} disagrees with {RECORDS}: run `python -m retinaseg.results`", file=sys.stderr)
            sys.exit(1 if stale else 0)
        for page, roles in PAGES.items():
            write_text(page, rendered(page.read_text(), records, roles))
            log.info("rendered %s", page)


if __name__ == "__main__":
    main()
