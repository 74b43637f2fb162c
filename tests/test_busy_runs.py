"""A run in use is not deleted under its user: Delete run refuses a run that trains, or that an export or an
evaluation of it works on (holds.hold_run), and says what to wait for; the other job finishes. Through the real app's
API on a real run folder, and through the real functions for a holder that died."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.apps import endpoint_args, served_app
from helpers.run_folders import make_adapter_run
from phi3_lora import holds, jobs, runs
from phi3_lora.errors import UserError
from phi3_lora.runs import RunDir

RUN_ID = "20260103-000000-busy"


def _wait_until_working(job: object, run: RunDir, timeout: float = 300) -> None:
    """Until the app works on the job (gradio's own status) and, on a busy machine, until the request has got as far
    as holding its run (a file in the run's .holds; at most 20 s more, so that a build without holds is tested too)."""
    from gradio_client.utils import Status

    deadline = time.monotonic() + timeout
    while job.status().code not in (Status.PROCESSING, Status.PROGRESS, Status.ITERATING, Status.FINISHED):
        assert time.monotonic() < deadline, "the export never started"
        time.sleep(0.05)
    deadline = time.monotonic() + 20
    while not list((run.path / ".holds").glob("*")) and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.slow
def test_deleting_a_run_while_its_merge_runs_is_refused_and_the_merge_finishes(tmp_path: Path,
                                                                               tiny_llama_dir: Path) -> None:
    """A merge of the run is under way (the Export tab); Delete run is pressed: it is refused with what is running and
    what to do, the run stays, and the merge ends with its model saved. Once the merge is done the delete goes
    through. Without the hold the folder was moved away under the merge, which then failed."""
    from gradio_client import Client

    runs_dir = tmp_path / "runs"
    make_adapter_run(runs_dir, tiny_llama_dir, RUN_ID)
    run = RunDir(runs_dir / RUN_ID)
    with served_app(runs_dir, tiny_llama_dir) as (url, _):
        c = Client(url, verbose=False)
        job = c.submit(*endpoint_args(c, "export_merged", Adapter=RUN_ID), api_name="/export_merged")
        _wait_until_working(job, run)
        assert not job.done(), "the merge ended before the delete could be tried"
        try:
            c.predict(RUN_ID, api_name="/delete_run")
            refused = ""
        except Exception as exc:  # the refusal (gr.Error)
            refused = str(exc)
        assert "is in use, so it cannot be deleted now: a merge of it is running" in refused, refused
        assert "Wait until it finishes" in refused and "Traceback" not in refused
        assert run.exists()
        status, _ = job.result(timeout=600)
        assert "Merged model saved" in str(status), status
        assert (run.path / "merged" / "config.json").is_file()
        assert holds.holds_of(run) == []
        c.predict(RUN_ID, api_name="/delete_run")
        assert not run.path.exists()


def test_a_hold_of_a_process_that_died_does_not_block_a_delete(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """A process that held the run (an app that crashed mid-export) leaves its hold file behind: its lock went with
    it, so Delete run is not blocked by it; while a holder lives, the library's delete refuses too."""
    runs_dir = tmp_path / "runs"
    run = RunDir(runs_dir / RUN_ID)
    run.path.mkdir(parents=True)
    run.config.write_text("{}\n")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom phi3_lora import holds, runs\n"
        f"with holds.hold_run(runs.RunDir({str(run.path)!r}), 'a GGUF export'):\n"
        "    print('held', flush=True); time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="a GGUF export of it is running") as info:
            jobs.delete_run(RUN_ID, runs_dir)
        assert "Wait until it finishes" in str(info.value)
    finally:
        holder.kill()
        holder.wait()
    assert list((run.path / RunDir.HOLDS).iterdir())  # left behind by the killed holder
    jobs.delete_run(RUN_ID, runs_dir)
    assert not run.path.exists()


def _cli(*args: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # a file, not a pipe that could fill up
        return subprocess.Popen([sys.executable, "-m", "phi3_lora", *args], stdout=out, stderr=subprocess.STDOUT)


def _wait_for(what: str, found, proc: subprocess.Popen, log: Path, timeout: float = 300) -> Path:
    deadline = time.monotonic() + timeout
    while not (hit := found()):
        assert proc.poll() is None, f"the CLI ended before {what}: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.02)
    return hit


@pytest.mark.slow
def test_the_cli_export_holds_its_run_and_a_stopped_gguf_export_leaves_no_temporary_merge(
        tmp_path: Path, tiny_llama_dir: Path) -> None:
    """`python -m phi3_lora export --gguf` on a run: the app's Delete run (jobs.delete_run) is refused while it works,
    as for the app's own exports (it was not held, so the run could be deleted under it); its temporary 16-bit merge
    lies inside the export folder (where the share of whoever made that folder is measured; it used to lie beside it,
    in the run), and a SIGTERM (kill) removes it (it used to stay for good) and releases the hold."""
    runs_dir = tmp_path / "runs"
    make_adapter_run(runs_dir, tiny_llama_dir, RUN_ID)
    run, out, log = RunDir(runs_dir / RUN_ID), runs_dir / RUN_ID / "gguf-f16", tmp_path / "cli.log"
    cli = _cli("export", "--adapter", str(run.path), "--gguf", str(out), log=log)
    try:
        _wait_for("a hold of the run", lambda: holds.holds_of(run), cli, log)
        with pytest.raises(UserError, match="a command-line export of it is running") as info:
            jobs.delete_run(RUN_ID, runs_dir)
        assert "Wait until it finishes" in str(info.value) and run.exists()
        # the GGUF is written from the merge and verified against it (a fresh process): the merge stays meanwhile
        merge = _wait_for("the temporary merge in the export folder",
                          lambda: [p for p in out.glob(".merged-tmp-*") if (p / "config.json").exists()], cli, log)
        assert not [p.name for p in run.path.iterdir() if "tmp" in p.name]
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=120) == 130, log.read_text()[-2000:]
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert not merge[0].exists() and not out.exists()  # the folder it made for the export goes too: nothing in it
    assert "Traceback" not in log.read_text()
    assert holds.holds_of(run) == []
    jobs.delete_run(RUN_ID, runs_dir)
    assert not run.path.exists()


@pytest.mark.slow
def test_the_cli_evaluation_holds_its_run_until_it_is_saved(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """`python -m phi3_lora evaluate` on a run saves its result into the run: Delete run is refused until it ends (it
    was not held, so the run could be deleted under it), and the result is saved."""
    from helpers.training import write_rows

    runs_dir = tmp_path / "runs"
    make_adapter_run(runs_dir, tiny_llama_dir, RUN_ID)
    run, log = RunDir(runs_dir / RUN_ID), tmp_path / "cli.log"
    rows = write_rows(tmp_path / "rows.jsonl", n=4)
    cli = _cli("evaluate", "--adapter", str(run.path), "--data", str(rows), "--max-new-tokens", "4", log=log)
    try:
        _wait_for("a hold of the run", lambda: holds.holds_of(run), cli, log)
        with pytest.raises(UserError, match="a command-line evaluation of it is running"):
            jobs.delete_run(RUN_ID, runs_dir)
        assert cli.wait(timeout=600) == 0, log.read_text()[-2000:]
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert list((run.path / "eval").glob("*.json")) and holds.holds_of(run) == []
    jobs.delete_run(RUN_ID, runs_dir)
