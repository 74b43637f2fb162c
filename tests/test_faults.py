"""Runs survive faults: kill -9 during a save, Stop releases the process, out of memory, a full disk, and an app
restarted while a run trains. Each fault is injected for real (signals, RLIMIT_AS, a tiny tmpfs)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from helpers.apps import ENDLESS_STEPS, SAMPLE, free_port, start_args, val
from helpers.training import slow_config, wait_until
from phi3_lora import events, jobs
from phi3_lora.errors import UserError
from phi3_lora.runs import RunDir, parse_checkpoint_step, pid_alive, run_dirs
from helpers.train_hooks.sitecustomize import MEMORY_LIMIT_ENV, SLOW_SAVE_ENV

pytestmark = pytest.mark.slow

CHECKPOINT_FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "trainer_state.json")


def step_of(path: Path) -> int:
    return parse_checkpoint_step(path.name)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    return [p for _, p in RunDir(run_dir).checkpoint_dirs()]


def assert_loadable(model_dir: Path, ckpt: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for name in CHECKPOINT_FILES:
        assert (ckpt / name).is_file(), f"{ckpt} lacks {name}"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(ckpt))


# --- kill -9 during a save; Resume; Stop releases the process; save_total_limit --------------------------------

def test_kill_9_during_a_save_resume_and_stop(tmp_path, tiny_phi3_dir, monkeypatch, train_hooks):
    runs = tmp_path / "runs"
    save_steps = 3
    cfg = slow_config(tiny_phi3_dir, tmp_path, max_steps=400, save_steps=save_steps)  # save_total_limit 2
    monkeypatch.setenv(SLOW_SAVE_ENV, "4")  # each save pauses between the adapter and the optimizer state
    run_id = jobs.start_run(cfg, runs)
    run_dir = runs / run_id
    first = wait_until(lambda: RunDir(run_dir).last_checkpoint(), timeout=180)
    staging = RunDir(run_dir).staging
    # the staging folder appears before its first file is written: wait for the adapter, then kill in the pause
    half = wait_until(lambda: next((p for p in staging.glob("checkpoint-*")
                                    if (p / "adapter_model.safetensors").exists()), None), timeout=120, poll=0.05)
    assert step_of(half) > step_of(first)
    assert (half / "adapter_model.safetensors").exists() and not (half / "optimizer.pt").exists()  # half-written
    pid = RunDir(run_dir).read_process().pid
    os.killpg(pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(pid), timeout=30)

    st = events.run_status(run_dir)
    assert st.state == "interrupted" and "Resume" in st.reason
    assert not (RunDir(run_dir).checkpoints / half.name).exists(), "a half-written save must never be a checkpoint"
    newest = RunDir(run_dir).last_checkpoint()
    assert newest == first and st.step - step_of(newest) <= save_steps  # at most one save interval lost
    assert_loadable(tiny_phi3_dir, newest)

    # Resume continues from the newest complete checkpoint; the half-written staging folder is cleared.
    monkeypatch.delenv(SLOW_SAVE_ENV)
    jobs.resume_run(run_id, runs)
    wait_until(lambda: events.run_status(run_dir).state == "running"
               and events.run_status(run_dir).step >= step_of(newest) + 3 * save_steps + 1, timeout=180)
    start = [e for e in events.read_events(run_dir) if e["type"] == "start"][-1]
    assert start["resumed_from"].endswith(newest.name) and start["step"] == step_of(newest)

    # Stop: the process is gone and its memory released (no /proc entry, not even a zombie) within 30 s.
    pid = RunDir(run_dir).read_process().pid
    t0 = time.time()
    st = jobs.stop_run(run_id, runs)
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=30 - (time.time() - t0), poll=0.1)
    print(f"\n[faults] Stop -> process gone and reaped in {time.time() - t0:.1f} s")
    assert time.time() - t0 < 30 and st.state == "stopped" and jobs.active_run(runs) is None
    # Every save since the resume finished its rename: no staging folder (the killed save's is cleared too).
    # (Checked once the process is gone: while it runs, each save briefly has a staging folder of its own.)
    assert not staging.exists()
    # save_total_limit=2: four or more saves happened, two are kept, the newest is loadable.
    kept = complete_checkpoints(run_dir)
    assert len(kept) == 2, kept
    assert kept[-1] == RunDir(run_dir).last_checkpoint() and step_of(kept[-1]) >= st.step - 1
    assert_loadable(tiny_phi3_dir, kept[-1])


# --- out of memory: forced with RLIMIT_AS, through the app ----------------------------------------------------

def launch_app(runs: Path, model_dir: Path):
    from gradio_client import Client

    from phi3_lora.ui import build_app, launch

    demo = build_app(runs, default_model=str(model_dir))
    _, url, _ = launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    return demo, Client(url, verbose=False)


def test_out_of_memory_fails_clearly_and_the_app_keeps_serving(tmp_path, tiny_llama_dir, monkeypatch, train_hooks):
    runs = tmp_path / "runs"
    rows = [{"messages": [{"role": "user", "content": f"Question {i}: " + "please explain " * 200},
                          {"role": "assistant", "content": "Because " * 300}]} for i in range(32)]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # The child caps its address space at what it has mapped + 64 MB when the loop starts: a batch of 16 x 512
    # tokens needs > 1.5 GB for the logits alone.
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "64")
    demo, c = launch_app(runs, tiny_llama_dir)
    try:
        args = start_args(c, **{"Data source": str(data), "Max steps": 5, "Batch size": 16,
                                "Max length (tokens)": 512})
        run_id = val(c.predict(*args, api_name="/start_training")[0])
        st = wait_until(lambda: (s := events.run_status(runs / run_id)).state in ("failed", "interrupted",
                                                                                   "finished") and s, timeout=240)
        assert st.state == "failed" and st.reason == events.OOM_REASON, (st, jobs.log_tail(run_id, runs))
        assert "out of memory" in st.reason and "QLoRA" in st.reason and "per_device_train_batch_size" in st.reason
        status_html = c.predict(run_id, api_name="/select_run")[0]
        assert "failed" in status_html and "out of memory" in status_html and "QLoRA" in status_html
        wait_until(lambda: jobs.active_run(runs) is None, timeout=60)  # the failed process exits
        # The app keeps serving: other endpoints answer.
        assert val(c.predict(api_name="/load_page")[0]) == run_id
        assert c.predict(*args, api_name="/show_config")[0]
    finally:
        demo.close()


# --- disk ----------------------------------------------------------------------------------------------------

def test_disk_needed_is_adapter_plus_optimizer_per_checkpoint():
    n = 1_000_000
    per_ckpt = 12 * n + jobs.CHECKPOINT_OVERHEAD_BYTES
    assert jobs.disk_needed(n, 2) == 3 * per_ckpt + 4 * n + jobs.CHECKPOINT_OVERHEAD_BYTES + jobs.DISK_MARGIN_BYTES
    assert jobs.disk_needed(n, 5) - jobs.disk_needed(n, 2) == 3 * per_ckpt  # grows with save_total_limit
    assert jobs.disk_needed(25_000_000, 2) > 2**30 > jobs.disk_needed(100_000, 1)


def test_trainable_params_come_from_the_model_config(tiny_phi3_dir, tmp_path):
    from transformers import AutoConfig

    from phi3_lora import targets

    cfg = slow_config(tiny_phi3_dir, tmp_path)
    expected = targets.count_lora_parameters(AutoConfig.from_pretrained(tiny_phi3_dir), cfg.lora)[0]
    assert jobs.trainable_params_for(cfg) == expected > 0
    missing = cfg.replace(model={"name": str(tmp_path / "no-such-model")})
    assert jobs.trainable_params_for(missing) == jobs.FALLBACK_TRAINABLE_PARAMS


def test_start_is_refused_when_the_disk_is_too_small(tiny_disk, tiny_phi3_dir, tmp_path):
    runs = tiny_disk("2m")
    cfg = slow_config(tiny_phi3_dir, tmp_path)
    with pytest.raises(UserError) as info:
        jobs.start_run(cfg, runs)
    message = str(info.value)
    assert "Not enough disk space" in message and str(runs) in message and "save_total_limit" in message
    assert jobs.active_run(runs) is None and not run_dirs(runs)


def fill(folder: Path, leave: int) -> Path:
    """Fill the filesystem holding `folder`, then give back `leave` bytes."""
    filler = folder / "filler.bin"
    chunk = b"\0" * 2**20
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(chunk)
                fh.flush()
        except OSError:
            pass
    with open(filler, "r+b") as fh:
        fh.truncate(max(0, filler.stat().st_size - leave))
    return filler


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tiny_disk, tiny_phi3_dir, tmp_path):
    runs = tiny_disk("64m")
    cfg = slow_config(tiny_phi3_dir, tmp_path, max_steps=400, save_steps=3)
    run_id = jobs.start_run(cfg, runs, need_bytes=0)  # the start check is the other test; here the disk fills later
    run_dir = runs / run_id
    wait_until(lambda: RunDir(run_dir).last_checkpoint(), timeout=180)
    filler = fill(runs, leave=256 * 2**10)  # room for a few events, not for the next checkpoint's tokenizer files
    # The newest complete checkpoint once the disk is full (the run keeps saving every 3 steps while it fills). A save
    # under way while the disk filled may have written most of its files already and still complete: taken once that
    # save is over (its staging folder gone: renamed into place or removed), or the run has ended.
    wait_until(lambda: not RunDir(run_dir).staging.exists() or not events.run_status(run_dir).active, timeout=120)
    good = RunDir(run_dir).last_checkpoint()
    before = {p.name: p.read_bytes() for p in good.iterdir() if p.is_file()}
    st = wait_until(lambda: not (s := events.run_status(run_dir)).active and s, timeout=120)
    assert st.state == "failed" and st.reason == events.DISK_FULL_REASON, (st, jobs.log_tail(run_id, runs))
    assert "disk full" in st.reason and "Free some space" in st.reason and "Resume" in st.reason

    # The previous checkpoint is intact and is still the one Resume would use; the failed save left nothing.
    assert RunDir(run_dir).last_checkpoint() == good
    assert {p.name: p.read_bytes() for p in good.iterdir() if p.is_file()} == before
    assert not (RunDir(run_dir).staging).exists()
    assert_loadable(tiny_phi3_dir, good)
    # Resume on the still-full disk is refused up front, saying why.
    wait_until(lambda: jobs.active_run(runs) is None, timeout=60)  # the failed process has exited
    with pytest.raises(UserError, match="Not enough disk space"):
        jobs.resume_run(run_id, runs)
    filler.unlink()
    shutil.rmtree(run_dir)  # before the unmount


# --- the app restarted while a run trains ----------------------------------------------------------------------

def test_restarted_app_finds_the_running_run(tmp_path, tiny_llama_dir):
    runs = tmp_path / "runs"
    demo, c = launch_app(runs, tiny_llama_dir)
    try:
        args = start_args(c, **{"Data source": str(SAMPLE), "Max steps": ENDLESS_STEPS, "Max length (tokens)": 128})
        run_id = val(c.predict(*args, api_name="/start_training")[0])
        wait_until(lambda: events.run_status(runs / run_id).state == "running", timeout=180)
    finally:
        demo.close()  # the app goes away; the run is its own process session and keeps training
    pid = RunDir(runs / run_id).read_process().pid
    step = events.run_status(runs / run_id).step
    try:
        assert pid_alive(pid)
        demo2, c2 = launch_app(runs, tiny_llama_dir)
        try:
            loaded = c2.predict(api_name="/load_page")
            assert val(loaded[0]) == run_id
            assert "training" in loaded[1] or "starting" in loaded[1], loaded[1]
            wait_until(lambda: events.run_status(runs / run_id).step > step, timeout=120)  # still training
            out = c2.predict(run_id, api_name="/stop_training")  # and the new app can stop it
            assert "stopped" in out[1]
        finally:
            demo2.close()
    finally:
        if pid_alive(pid):
            jobs.stop_run(run_id, runs, grace=5)


def test_torch_saves_short_write_on_a_full_disk_reads_as_disk_full(tiny_disk, tmp_path):
    """torch.save's zip writer loses ENOSPC and raises 'unexpected pos': a checkpoint's optimizer state meeting a
    full disk must still read as disk full (then the run's reason says to free space and Resume)."""
    import torch

    from phi3_lora.errors import is_disk_full

    runs = tiny_disk("8m")
    fill(runs, leave=0)
    with pytest.raises(Exception) as caught:
        torch.save({"state": torch.zeros(2**20)}, runs / "optimizer.pt")
    assert is_disk_full(caught.value), repr(caught.value)
    assert not is_disk_full(RuntimeError("[enforce fail at inline_container.cc:300] . file not found"))
