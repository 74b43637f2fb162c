"""The time estimate: seconds per step from real steps on this machine, cached per setup; steps as Trainer counts."""

from __future__ import annotations

import pytest

from helpers.training import tiny_config, write_rows
from phi3_lora import events, steptime, train
from phi3_lora.config import RunConfig, preset


def test_seconds_per_step_leaves_out_the_warm_up_step_and_earlier_sessions(tmp_path):
    events.append_event(tmp_path, "start", step=0, max_steps=10)
    for step, t in ((1, 9.0), (2, 11.0), (3, 13.0)):
        events.append_event(tmp_path, "log", step=step, max_steps=10, loss=1.0, elapsed_seconds=t)
    assert steptime.seconds_per_step(events.read_events(tmp_path)) == pytest.approx(2.0)
    events.append_event(tmp_path, "start", step=3, max_steps=10)  # resumed: a new session, its own clock
    for step, t in ((4, 30.0), (5, 35.0), (6, 40.0)):
        events.append_event(tmp_path, "log", step=step, max_steps=10, loss=1.0, elapsed_seconds=t)
    assert steptime.seconds_per_step(events.read_events(tmp_path)) == pytest.approx(5.0)


def test_one_logged_step_is_no_measurement(tmp_path):
    events.append_event(tmp_path, "start", step=0, max_steps=1)
    events.append_event(tmp_path, "log", step=1, max_steps=1, loss=1.0, elapsed_seconds=4.0)
    assert steptime.seconds_per_step(events.read_events(tmp_path)) is None


def test_planned_steps_count_like_the_trainer():
    cfg = RunConfig().replace(train={"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                                     "num_train_epochs": 3, "max_steps": -1})
    assert steptime.planned_steps(cfg, 91) == 3 * 12       # ceil(91 / 8) per epoch
    assert steptime.planned_steps(cfg, 91, processes=2) == 3 * 6
    assert steptime.planned_steps(cfg.replace(train={"max_steps": 7}), 91) == 7


def test_a_measurement_is_kept_per_setup_and_scales_with_accumulation(tmp_path):
    cfg = preset("quick-cpu")
    steptime.record(tmp_path, cfg, 3.0, "3 timed steps")
    assert steptime.lookup(tmp_path, cfg).seconds_per_step(cfg) == pytest.approx(3.0)
    # learning rate and epochs do not change a step's cost; accumulation multiplies it; max length is another setup
    same = cfg.replace(train={"learning_rate": 5e-4, "num_train_epochs": 1, "gradient_accumulation_steps": 2})
    assert steptime.lookup(tmp_path, same).seconds_per_step(same) == pytest.approx(6.0)
    assert steptime.lookup(tmp_path, cfg.replace(train={"max_length": 512})) is None
    text = steptime.describe(cfg, steptime.lookup(tmp_path, cfg), 91)
    assert "about 3 min 27 s for 69 steps" in text and "3.00 s per step" in text  # 3 epochs × ceil(91 / 4)


@pytest.mark.slow
def test_a_finished_run_keeps_its_step_time_for_the_next_estimate(tmp_path, tiny_llama_dir):
    cfg = tiny_config(tiny_llama_dir, write_rows(tmp_path / "d.jsonl", n=8), max_steps=3, eval_steps=None,
                      per_device_train_batch_size=2)
    cfg = cfg.replace(model={"load_in_4bit": False}, data={"eval_fraction": 0.0})
    runs = tmp_path / "runs"
    train.run(cfg, runs / "r1")
    kept = steptime.lookup(runs, cfg)
    assert kept is not None and kept.how == "run r1"
    assert kept.seconds_per_step(cfg) == pytest.approx(steptime.seconds_per_step(events.read_events(runs / "r1")))


@pytest.mark.slow
def test_measure_times_real_steps_in_a_child_process(tmp_path, tiny_llama_dir):
    cfg = tiny_config(tiny_llama_dir, write_rows(tmp_path / "d.jsonl", n=8), eval_steps=None,
                      per_device_train_batch_size=2).replace(model={"load_in_4bit": False})
    runs = tmp_path / "runs"
    measured = steptime.measure(cfg, runs)
    assert measured.how == f"{steptime.TIMED_STEPS} timed steps" and measured.seconds_per_step(cfg) > 0
    assert steptime.lookup(runs, cfg) == measured
    assert not [p for p in runs.iterdir() if p.name.startswith(".measure")]  # the child's run folder is gone
