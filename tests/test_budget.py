"""budget: a calibration fixes the optimizer steps, which are recorded, honoured, and rerun exactly."""

import json
import math

import pytest
import torch

from helpers.commands import error_lines, run_entry_point
from helpers.configs import TINY_SYNTHETIC, compose_config
from retinaseg.core.errors import ConfigError
from retinaseg.runs import budget
from retinaseg.runs.rundir import RunDir
from retinaseg.train import train


@pytest.mark.parametrize(
    ("duration", "expected"),
    [("00:00:15:00", 900), ("15:00", 900), ("1:00:00", 3600), ("01:00:00:00", 86400), (90, 90), (2.5, 2.5)],
)
def test_durations(duration, expected):
    assert budget.seconds(duration) == expected


@pytest.mark.parametrize("duration", ["fifteen minutes", "1:2:3:4:5", 0, "-00:01:00", True])
def test_bad_durations_are_refused(duration):
    with pytest.raises(ConfigError, match="budget"):
        budget.seconds(duration)


def test_trainer_budget_names_the_top_level_key_that_replaced_it():
    with pytest.raises(ConfigError) as refused:
        budget.refuse_trainer_budget(["experiment=drive_cpu", "trainer.budget=00:00:15:00"])
    assert str(refused.value) == "trainer.budget is now the top-level key budget: pass budget=00:00:15:00"
    with pytest.raises(ConfigError, match="pass budget="):
        budget.refuse_trainer_budget(["+trainer.budget=60"])
    budget.refuse_trainer_budget(["budget=00:00:15:00", "trainer.max_steps=5"])


@pytest.mark.slow
def test_trainer_budget_on_the_command_line_is_one_error_line(tmp_path):
    result = run_entry_point("train", ["trainer.budget=60", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = error_lines(result.stderr)
    assert "trainer.budget is now the top-level key budget: pass budget=60" in line
    assert not (tmp_path / "run").exists()


CALIBRATION = budget.Calibration(
    step_s=0.1, warmup_s=0.5, validation_s=1.0, checkpoint_s=0.1, test_s=5.0, sanity_s=0.25, elapsed_s=9.5
)


def test_plan_fills_the_budget_with_whole_epochs():
    plan = budget.plan(100.0, CALIBRATION, steps_per_epoch=10)
    # steps (with the run's own overhead), validation, best.ckpt and last.ckpt
    per_epoch = 10 * 0.1 * (1 + budget.RUN_STEP_OVERHEAD) + 1.0 + 2 * 0.1
    fixed = 9.5 + 0.5 + 0.25 + 5.0  # setup and calibration, the run's first steps, sanity check, test
    assert plan.epochs == math.floor((100.0 * (1 - budget.MARGIN) - fixed) / per_epoch) == 35
    assert plan.max_steps == 350 and plan.steps_per_epoch == 10
    assert plan.expected_s == pytest.approx(fixed + 35 * per_epoch)
    assert plan.expected_s <= 100.0 * (1 - budget.MARGIN) < plan.expected_s + per_epoch


def test_a_budget_too_short_for_one_epoch_says_what_to_do():
    with pytest.raises(ConfigError, match="no time for one epoch.*data.patches_per_epoch"):
        budget.plan(16.0, CALIBRATION, steps_per_epoch=10)


def test_a_continued_run_keeps_its_recorded_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(budget, "calibrate", lambda *args: pytest.fail("a continued run must not calibrate"))
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    (first / "budget.json").write_text(json.dumps({"max_steps": 123}))
    cfg = compose_config("train", TINY_SYNTHETIC + ["budget=00:00:15:00"], second)
    steps = budget.budget_steps(cfg, None, None, str(first / "checkpoints" / "last.ckpt"), RunDir(second), 0.0)
    assert steps == 123
    record = json.loads((second / "budget.json").read_text())
    assert record["max_steps"] == 123 and record["source"] == str((first / "budget.json").resolve())

    (first / "budget.json").unlink()
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        budget.budget_steps(cfg, None, None, str(first / "checkpoints" / "last.ckpt"), RunDir(second), 0.0)


def test_a_budget_is_for_one_process(tmp_path):
    cfg = compose_config("train", TINY_SYNTHETIC + ["budget=60", "trainer.devices=2"], tmp_path)
    with pytest.raises(ConfigError, match="single-process"):
        budget.budget_steps(cfg, None, None, None, RunDir(tmp_path), 0.0)


@pytest.mark.slow
def test_budgeted_steps_are_recorded_honoured_and_rerun_exactly(tmp_path, monkeypatch):
    # The calibration runs for real (one timed step); only its outcome is fixed, at 3 epochs, so that the
    # test does not depend on this machine's speed.
    monkeypatch.setattr(budget, "CALIBRATION_SECONDS", 0.0)
    monkeypatch.setattr(budget, "plan", lambda budget_s, c, steps: budget.Plan(budget_s, 3 * steps, 3, steps, 0.0, c))
    overrides = TINY_SYNTHETIC + ["model.scheduler=cosine", "budget=00:00:10:00"]

    train(compose_config("train", overrides, tmp_path / "budget"))
    record = json.loads((tmp_path / "budget" / "budget.json").read_text())
    steps = record["max_steps"]
    assert record["source"] == "calibration" and record["epochs"] == 3 and steps == 3 * record["steps_per_epoch"]
    assert record["calibration"]["step_s"] > 0 and record["rerun"] == f"trainer.max_steps={steps}"
    last = torch.load(tmp_path / "budget" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == steps
    # The cosine schedule spans exactly the budgeted steps, stepped once per optimizer step.
    schedule = last["lr_schedulers"][0]
    assert schedule["T_max"] == steps and schedule["last_epoch"] == steps

    # No calibration this time: identical numbers show that calibrating left the run untouched.
    monkeypatch.setattr(budget, "calibrate", lambda *args: pytest.fail("trainer.max_steps must not calibrate"))
    train(compose_config("train", overrides + [f"trainer.max_steps={steps}"], tmp_path / "rerun"))
    assert json.loads((tmp_path / "rerun" / "budget.json").read_text())["source"] == "trainer.max_steps"
    for name in ("metrics.json", "csv/metrics.csv"):
        budgeted = (tmp_path / "budget" / name).read_text().replace(str(tmp_path / "budget"), "<run>")
        rerun = (tmp_path / "rerun" / name).read_text().replace(str(tmp_path / "rerun"), "<run>")
        assert budgeted == rerun, name


def test_max_steps_lifts_the_experiments_time_stop(tmp_path):
    from retinaseg.train import lift_time_stop

    given = compose_config("train", ["experiment=drive_cpu", "budget=null", "trainer.max_steps=640"], tmp_path)
    lift_time_stop(given)
    assert given.trainer.max_time is None and given.trainer.max_steps == 640
    budgeted = compose_config("train", ["experiment=drive_cpu"], tmp_path)
    lift_time_stop(budgeted)
    assert budgeted.trainer.max_time == "00:00:15:00"  # a calibrated run keeps its hard stop


@pytest.mark.slow
def test_a_run_cut_short_by_max_time_says_so_in_its_records(tmp_path, caplog):
    overrides = ["trainer.max_epochs=1000", "+trainer.max_time=00:00:00:01"]
    cfg = compose_config("train", TINY_SYNTHETIC + overrides, tmp_path)
    with caplog.at_level("WARNING", logger="retinaseg.runs.callbacks"):
        train(cfg)
    training = json.loads((tmp_path / "metrics.json").read_text())["training"]
    assert training["planned_steps"] == 2000 and training["steps"] < 2000 and not training["complete"]
    assert training["stopped_by"].startswith("trainer.max_time reached")
    assert any(f"after {training['steps']} of its 2000 planned steps" in r.getMessage() for r in caplog.records)
