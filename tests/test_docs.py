"""The documentation stays true: every command it shows composes against the configs, its links lead somewhere,
and the results tables agree with their records."""

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException

from retinaseg import results
from retinaseg.core.errors import ConfigError, DataError
from retinaseg.evaluation.records import BEGIN, END, load_records, record_of, rendered, table

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BASH_BLOCK = re.compile(r"^ *```bash\n(.*?)^ *```", re.S | re.M)
PLACEHOLDER = re.compile(r"<[^<>\n]*>|(?<==)\.\.\.(?=\s|$)")
DUMMY = "PLACEHOLDER"
INLINE_COMMAND = re.compile(r"(?<!`)`((?:[A-Z_]+=\S+ )*python -m retinaseg\.[a-z][^`]*)`")
# What a synopsis leaves out: any other overrides.
ELIDED = ("-m", DUMMY, "...", "[overrides]")
ENV_PREFIX = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def shown_commands() -> list[tuple[str, str]]:
    """(where, command line) of every `python -m retinaseg.<command>` of README.md and docs/: each line of a bash
    block, and each inline code span that starts with it."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for block in BASH_BLOCK.finditer(text):
            first_line = text[: block.start()].count("\n") + 2
            lines = block.group(1).replace("\\\n", " ").splitlines()
            for number, line in enumerate(lines, first_line):
                for part in line.split("&&"):
                    if "python -m retinaseg." in part:
                        found.append((f"{page.relative_to(ROOT)}:{number}", part.strip()))
        for span in INLINE_COMMAND.finditer(text):
            number = text[: span.start()].count("\n") + 1
            found.append((f"{page.relative_to(ROOT)}:{number}", " ".join(span.group(1).split())))
    return found


def command_and_overrides(line: str) -> tuple[str, list[str]]:
    """The command's name and its overrides, placeholders given a dummy value and each sweep its first value."""
    tokens = shlex.split(PLACEHOLDER.sub(DUMMY, line), comments=True)
    while ENV_PREFIX.match(tokens[0]):
        tokens.pop(0)
    assert tokens[:2] == ["python", "-m"], line
    command = tokens[2].removeprefix("retinaseg.")
    overrides = []
    for token in tokens[3:]:
        if token in ELIDED:
            continue
        if token.startswith("[") and token.endswith("]"):  # an optional setting of a synopsis: [split=test|val|all]
            token = token[1:-1].split("|")[0]
        if token.startswith("data=" + DUMMY):  # a dataset left to the reader
            token = "data=drive"
        overrides.append(token)
    parsed = OverridesParser.create().parse_overrides(overrides)
    return command, [
        f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override() else o.input_line
        for o in parsed
    ]


def compose_command(command: str, overrides: list[str]) -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "retinaseg" / "conf"), version_base="1.3"):
        compose(config_name=command, overrides=overrides, return_hydra_config=True)


def test_docs_show_commands():
    # Guards the extraction itself: an empty list would pass every check below.
    commands = {command_and_overrides(line)[0] for _, line in shown_commands()}
    assert {"train", "eval", "predict", "compare", "export", "benchmark", "results"} <= commands


@pytest.mark.parametrize(("where", "line"), shown_commands(), ids=[where for where, _ in shown_commands()])
def test_shown_command_composes(where, line):
    command, overrides = command_and_overrides(line)
    assert (ROOT / "retinaseg" / "conf" / f"{command}.yaml").is_file(), f"{where}: no command retinaseg.{command}"
    compose_command(command, overrides)


def test_command_with_stale_setting_fails_to_compose():
    with pytest.raises(ConfigCompositionException, match="no_such_setting"):
        compose_command(*command_and_overrides("python -m retinaseg.train data.no_such_setting=1"))


def test_placeholders_sweeps_and_synopses():
    command, overrides = command_and_overrides(
        "DRIVE_ROOT=/d python -m retinaseg.eval -m ckpt_path=<run dir>/best.ckpt data=<B> 'data.fold=range(5)' "
        "[split=test|val|all] model.lr=1e-3,1e-2  # a comment"
    )
    assert command == "eval"
    assert overrides == [f"ckpt_path={DUMMY}/best.ckpt", "data=drive", "data.fold=0", "split=test", "model.lr=0.001"]


def test_readme_links_lead_to_files():
    text = (ROOT / "README.md").read_text()
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)]+)\)", text) if "://" not in t]
    assert targets
    assert [t for t in targets if not (ROOT / t).exists()] == []


def test_results_pages_agree_with_records():
    assert results.stale_pages(load_records(results.RECORDS)) == []


def test_stale_results_page_is_found(tmp_path, monkeypatch):
    page = tmp_path / "results.md"
    page.write_text(f"intro\n{BEGIN}\n| an old table |\n{END}\n")
    monkeypatch.setattr(results, "PAGES", {page: ("reference",)})
    assert results.stale_pages(load_records(results.RECORDS)) == [page]
    page.write_text(rendered(page.read_text(), load_records(results.RECORDS), ("reference",)))
    assert results.stale_pages(load_records(results.RECORDS)) == []


def test_record_from_an_evaluation(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text("- experiment=drive_cpu\n- seed=1\n")
    torch.save({"global_step": 640}, run / "checkpoints" / "best.ckpt")
    (run / "train.log").write_text(
        "[2026-01-02 03:04:05,000][__main__][INFO] - start\nnot a log line\n"
        "[2026-01-02 03:19:06,500][__main__][INFO] - test metrics\n"
    )
    evaluation = tmp_path / "eval"
    (evaluation / ".hydra").mkdir(parents=True)
    (evaluation / ".hydra" / "overrides.yaml").write_text(f"- ckpt_path={run}/checkpoints/best.ckpt\n")
    observer = {"f1": 0.79, "ci95": {"f1": [0.78, 0.80]}}
    metrics = {
        "f1": 0.82,
        "auc": 0.98,
        "ci95": {"f1": [0.81, 0.83], "auc": [0.97, 0.99]},
        "second_observer": observer,
        "dataset": "drive",
        "split": "test",
        "n_images": 20,
        "threshold": 0.5,
        "checkpoint": str(run / "checkpoints" / "best.ckpt"),
    }
    (evaluation / "metrics.json").write_text(json.dumps(metrics))
    settings = dict(eval_dir=evaluation, name="x", title="x", role="reference", machine="M", version="abc")
    record = record_of(**settings, scorer="model")
    assert record.command == [
        "python -m retinaseg.train experiment=drive_cpu seed=1",
        f"python -m retinaseg.eval ckpt_path={run}/checkpoints/best.ckpt",
    ]
    assert (record.steps, record.wall_time_s, record.machine, record.version) == (640, 901, "M", "abc")
    assert record.metrics == {"f1": [0.82, 0.81, 0.83], "auc": [0.98, 0.97, 0.99]}
    assert "| x | 0.8200<br>[0.8100, 0.8300] | 0.9800<br>[0.9700, 0.9900] | – | – | 640 | 15:01 | M |" in (
        table([record], ("reference",))
    )
    observer_record = record_of(**settings, scorer="second_observer")
    assert observer_record.metrics == {"f1": [0.79, 0.78, 0.80]}
    assert (observer_record.steps, observer_record.wall_time_s) == (None, None)
    (run / "train.log").unlink()
    with pytest.raises(DataError, match="train.log is gone"):
        record_of(**settings, scorer="model")
    unnamed = record_of(**{**settings, "machine": None}, scorer="second_observer")
    assert unnamed.machine == "–"


def test_page_without_markers_is_refused():
    with pytest.raises(ConfigError, match="markers"):
        rendered("no table here", [], ("reference",))
