"""bench/device_call.sh's detached mode, run for real (bash, setsid, the follow loop) around a stand-in bench.

On the device the bench runs as its own process session that outlives each call: the first call starts it, every
call with the same command follows it and sends back its files so far, and the bench is told to start no run past
the first call's start + DETACH (a deadline bug here once cost a device call). The stand-in bench replaces
bench.train_speed (BENCH_MODULE) and writes its result in two steps, so the test sees a call return while the bench
runs on, the next call find it instead of starting another, and the files that come back each time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STAND_IN = '''
import json, os, sys, time
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
work, out = value("--workdir"), value("--json")
with open(os.path.join(work, "starts"), "a") as f:
    f.write(f"{os.getpid()}\\n")
state = {"argv": args, "deadline_epoch": float(value("--deadline-epoch")), "done": False}
json.dump(state, open(out, "w"))
print("stand-in bench: first result written", flush=True)
time.sleep(float(os.environ["STAND_IN_SECONDS"]))
json.dump(dict(state, done=True), open(out, "w"))
print("stand-in bench: runs done", flush=True)
'''


def call(tree: Path, out: Path, env: dict[str, str], limit: int) -> tuple[str, float]:
    began = time.time()
    proc = subprocess.run(["bash", "bench/device_call.sh", "--set", "main", "--rows", "=a row"], cwd=tree,
                          env=dict(env, OUT=str(out), CALL_LIMIT=str(limit)), capture_output=True, text=True,
                          timeout=limit + 30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, began


def test_a_detached_bench_outlives_the_call_and_the_next_call_follows_it(tmp_path):
    tree = tmp_path / "tree"
    (tree / "bench").mkdir(parents=True)
    (tree / "docs").mkdir()
    shutil.copy(ROOT / "bench" / "device_call.sh", tree / "bench" / "device_call.sh")
    (tree / "docs" / "benchmarks.md").write_text("# Benchmarks\n", encoding="utf-8")
    (tree / "stand_in_bench.py").write_text(STAND_IN, encoding="utf-8")
    bench_root = tmp_path / "root"
    env = dict(os.environ, BENCH_ROOT=str(bench_root), BENCH_MODULE="stand_in_bench", DETACH="600",
               STAND_IN_SECONDS="8")
    try:
        # The first call starts the bench and returns at its limit (the follow loop stops 10 s before it).
        said, began = call(tree, tmp_path / "out1", env, limit=12)
        assert "bench still running: send the same command again" in said
        first = json.loads((tmp_path / "out1" / "result.json").read_text(encoding="utf-8"))
        assert first["done"] is False and first["argv"][-3:] == ["main", "--rows", "=a row"]
        # Told to begin no run past the first call's start + DETACH, with 10 s kept for the tables.
        assert abs(first["deadline_epoch"] - (began + 600 - 10)) <= 2
        pid = int((bench_root / "detached" / "pid").read_text())
        os.kill(pid, 0)  # the bench outlived the call

        # The same command again follows the running bench (no second start) until it ends.
        said, _ = call(tree, tmp_path / "out2", env, limit=60)
        assert "bench ended" in said and "stand-in bench: runs done" in said
        assert json.loads((tmp_path / "out2" / "result.json").read_text(encoding="utf-8"))["done"] is True
        assert "stand-in bench: runs done" in (tmp_path / "out2" / "detached-log.txt").read_text(encoding="utf-8")
        assert len((bench_root / "starts").read_text().split()) == 1
    finally:
        pid_file = bench_root / "detached" / "pid"
        if pid_file.exists():
            subprocess.run(["kill", "--", f"-{pid_file.read_text().strip()}"], capture_output=True)
