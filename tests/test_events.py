"""events.jsonl folding into a status: what the UI and CLI show about a run."""

from __future__ import annotations

import os

from phi3_lora import events
from phi3_lora.runs import RunDir, pid_alive


def test_a_run_that_ended_is_finished_with_its_curve(tmp_path):
    events.append_event(tmp_path, "start", step=0, max_steps=4)
    for step, loss in [(1, 2.0), (2, 1.5)]:
        events.append_event(tmp_path, "log", step=step, max_steps=4, loss=loss, tokens_per_second=100.0)
    events.append_event(tmp_path, "eval", step=2, max_steps=4, eval_loss=1.7)
    events.append_event(tmp_path, "end", status="finished", step=4, max_steps=4)
    st = events.status_from_events(events.read_events(tmp_path), process_alive=False)
    assert st.state == "finished" and st.losses == [(1, 2.0), (2, 1.5)] and st.eval_losses == [(2, 1.7)]
    assert st.progress == 1.0 and not st.active


def test_a_dead_process_without_an_end_is_interrupted(tmp_path):
    events.append_event(tmp_path, "start", step=0, max_steps=10)
    events.append_event(tmp_path, "log", step=3, max_steps=10, loss=1.0)
    assert events.status_from_events(events.read_events(tmp_path), process_alive=True).state == "running"
    st = events.status_from_events(events.read_events(tmp_path), process_alive=False)
    assert st.state == "interrupted" and "Resume" in st.reason


def test_a_torn_last_line_is_skipped(tmp_path):
    events.append_event(tmp_path, "start", step=0, max_steps=10)
    with open(RunDir(tmp_path).events, "a") as fh:
        fh.write('{"t": 1, "type": "lo')  # killed mid-write
    assert [e["type"] for e in events.read_events(tmp_path)] == ["start"]


def test_errors_carry_their_reason(tmp_path):
    events.append_event(tmp_path, "start", step=0, max_steps=10)
    events.append_event(tmp_path, "error", reason=events.OOM_REASON)
    st = events.run_status(tmp_path)
    assert st.state == "failed" and "out of memory" in st.reason and "batch" in st.reason


def test_pid_alive_sees_our_own_process_and_not_a_dead_one():
    assert pid_alive(os.getpid())
    assert not pid_alive(None)
    assert not pid_alive(2**22 + 12345)


def test_a_resumed_run_keeps_one_loss_point_per_step(tmp_path):
    events.append_event(tmp_path, "start", step=0, max_steps=6)
    for step in (1, 2, 3):
        events.append_event(tmp_path, "log", step=step, max_steps=6, loss=float(step))
    events.append_event(tmp_path, "resume", step=3, max_steps=6)
    events.append_event(tmp_path, "start", step=2, max_steps=6, resumed_from=str(RunDir(tmp_path).checkpoint(2)))
    events.append_event(tmp_path, "log", step=3, max_steps=6, loss=30.0)
    st = events.run_status(tmp_path)
    assert st.losses == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_a_resumed_run_shows_no_eta_until_it_logs_again(tmp_path):
    """The ended session's "end" set the ETA to 0; while resuming it must read as unknown, not "0s"."""
    events.append_event(tmp_path, "start", step=0, max_steps=6)
    events.append_event(tmp_path, "log", step=2, max_steps=6, loss=1.0, eta_seconds=40.0)
    events.append_event(tmp_path, "end", status="stopped", step=2)
    events.append_event(tmp_path, "resume", step=2, max_steps=6)
    assert events.status_from_events(events.read_events(tmp_path), process_alive=True).eta_seconds is None
    events.append_event(tmp_path, "start", step=2, max_steps=6)
    assert events.status_from_events(events.read_events(tmp_path), process_alive=True).eta_seconds is None
    events.append_event(tmp_path, "log", step=3, max_steps=6, loss=1.0, eta_seconds=30.0)
    assert events.status_from_events(events.read_events(tmp_path), process_alive=True).eta_seconds == 30.0


def test_a_resume_from_step_0_is_a_new_attempt_not_a_continuation(tmp_path):
    """Killed before any checkpoint, Resume starts again at step 0: the old attempt's curve must not be joined
    to the new one (the start event's step 0 used to be ignored as falsy)."""
    events.append_event(tmp_path, "start", step=0, max_steps=6)
    for step in (1, 2, 3):
        events.append_event(tmp_path, "log", step=step, max_steps=6, loss=float(step))
    events.append_event(tmp_path, "end", status="stopped", step=3, max_steps=6, reason="killed")
    st = events.run_status(tmp_path)
    assert st.resume_text == "no checkpoint was saved, so Resume starts again from step 0"
    events.append_event(tmp_path, "resume", step=3, max_steps=6, from_step=0)
    events.append_event(tmp_path, "start", step=0, max_steps=6)
    events.append_event(tmp_path, "log", step=1, max_steps=6, loss=10.0)
    st = events.run_status(tmp_path)
    assert st.losses == [(1, 10.0)] and st.attempts == [0] and st.step == 1


def test_the_stop_grace_follows_measured_steps_and_saves():
    t0 = 1000.0
    start = {"t": t0, "type": "start", "step": 0}
    assert events.stop_grace([], 20, t0) == 20  # still loading: SIGTERM ends it at once
    fast = [start] + [{"t": t0 + s * 0.1, "type": "log", "step": s} for s in range(1, 6)]
    assert events.stop_grace(fast, 20, t0 + 0.6) == 20  # quick steps: the minimum
    slow = [start] + [{"t": t0 + s * 40.0, "type": "log", "step": s} for s in range(1, 4)]
    assert events.step_and_save_seconds(slow) == (40.0, None)
    assert events.stop_grace(slow, 20, t0 + 125) >= 40 + 40  # a 40 s step in progress, then a save
    saved = slow + [{"t": t0 + 200, "type": "checkpoint", "step": 3, "save_seconds": 90.0}]
    assert events.stop_grace(saved, 20, t0 + 201) >= 40 + 90
    assert events.stop_grace(saved + [{"t": t0, "type": "log", "step": 9}], 20, t0 + 10**6) == events.STOP_GRACE_MAX_S
