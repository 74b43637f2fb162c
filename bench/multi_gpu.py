"""Multi-GPU scaling and loss agreement, through the app's own launch path (phi3_lora.jobs).

    python -m bench.multi_gpu --gpus 2 --steps 30 --out results/      # on a machine with >= 2 GPUs

Runs, one after the other, each as `jobs.start_run` starts it (so `jobs.train_command`: plain
`python -m phi3_lora train` for one GPU, `accelerate launch --multi_gpu` for several):

  1. 1 GPU, per-device batch G*B (the same global batch as step 2), logging every step;
  2. G GPUs, per-device batch B, checkpoint at the last step;
  3. G GPUs, long run, stopped mid-way with `jobs.stop_run` (SIGTERM to the launcher's process group).

Same model, data, seed and data order (accelerate's seedable sampler shards one permutation), LoRA dropout 0
so the two curves differ only by numerics (bf16, reduction order across ranks). Tokens/s come from
events.jsonl: `tokens_seen` is transformers' num_input_tokens_seen, gathered (summed) over ranks each step.
While a run trains, nvidia-smi is sampled to show which process holds which GPU.

The model is bench/model_folders.py's random-weight Phi-3-mini shape (hidden 3072, 32 layers, vocab 32064) with
the real Phi-3 tokenizer, QLoRA NF4, max length 2048, packed chat-length mix, no memory budget (whole GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def smi(query: str, kind: str = "--query-compute-apps") -> list[list[str]]:
    try:
        out = subprocess.run(["nvidia-smi", f"{kind}={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if line.strip()]


def proc_info(pid: int) -> dict[str, Any]:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().decode(
            errors="replace").split("\0") if "=" in kv)
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ")[:160]
    except (OSError, IndexError):
        return {"pid": pid, "gone": True}
    return {"pid": pid, "ppid": int(stat[1]), "pgid": int(stat[2]), "sid": int(stat[3]), "cmd": cmd,
            "RANK": env.get("RANK"), "LOCAL_RANK": env.get("LOCAL_RANK"),
            **{k: env.get(k) for k in SAFE_ENV}}


class GpuSampler:
    """nvidia-smi every second: the processes on each GPU and their memory."""

    def __init__(self) -> None:
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self.uuid_index = {u: int(i) for i, u in smi("index,uuid", "--query-gpu")}
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            apps = [{"pid": int(p), "gpu": self.uuid_index.get(u, u), "mib": int(float(m))}
                    for p, u, m in smi("pid,gpu_uuid,used_memory") if p.isdigit()]
            self.samples.append({"t": time.time(), "apps": apps})
            self._stop.wait(1.0)

    def __enter__(self) -> "GpuSampler":
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join(timeout=30)

    def summary(self) -> dict[str, Any]:
        """Per pid: which GPUs it was seen on and its peak memory."""
        seen: dict[int, dict[str, Any]] = {}
        for s in self.samples:
            for a in s["apps"]:
                d = seen.setdefault(a["pid"], {"gpus": set(), "peak_mib": 0})
                d["gpus"].add(a["gpu"])
                d["peak_mib"] = max(d["peak_mib"], a["mib"])
        return {str(p): {"gpus": sorted(d["gpus"]), "peak_mib": d["peak_mib"]} for p, d in seen.items()}


def make_config(model_dir: Path, data: Path, gpus: int, per_device: int, steps: int, save_steps: int,
                lora_dropout: float) -> Any:
    from phi3_lora.config import RunConfig

    return RunConfig().replace(
        model={"name": str(model_dir), "load_in_4bit": True},
        lora={"r": 16, "lora_alpha": 32, "lora_dropout": lora_dropout, "target_modules": "all-linear"},
        train={"max_steps": steps, "max_length": 2048, "per_device_train_batch_size": per_device,
               "gradient_accumulation_steps": 1, "learning_rate": 1e-4, "warmup_ratio": 0.0, "seed": 0,
               "logging_steps": 1, "save_steps": save_steps, "save_total_limit": 2, "memory_budget_gb": None,
               "num_processes": gpus},
        data={"source": str(data), "eval_fraction": 0.0})


def read_run(run_dir: Path) -> dict[str, Any]:
    from phi3_lora import events

    evs = events.read_events(run_dir)
    logs = [e for e in evs if e["type"] == "log"]
    kinds: dict[str, int] = {}
    for e in evs:
        kinds[e["type"]] = kinds.get(e["type"], 0) + 1
    start = next((e for e in evs if e["type"] == "start"), {})
    end = next((e for e in reversed(evs) if e["type"] == "end"), {})
    return {"event_counts": kinds, "steps": [e["step"] for e in logs], "loss": [e["loss"] for e in logs],
            "tokens_seen": [e.get("tokens_seen") for e in logs], "elapsed": [e.get("elapsed_seconds") for e in logs],
            "grad_norm": [e.get("grad_norm") for e in logs], "options": start.get("options"),
            "train_rows": start.get("train_rows"), "end": {k: end.get(k) for k in ("status", "step", "reason")}}


def throughput(r: dict[str, Any], warmup: int) -> dict[str, float]:
    """Useful tokens/s (summed over ranks) between the warm-up's last log and the final one."""
    tok, el = r["tokens_seen"], r["elapsed"]
    if len(tok) <= warmup + 1:
        return {"tokens_per_s": float("nan")}
    dt, dn = el[-1] - el[warmup - 1], tok[-1] - tok[warmup - 1]
    return {"tokens_per_s": dn / dt, "timed_steps": len(tok) - warmup, "seconds": dt, "tokens": dn,
            "tokens_per_step": dn / (len(tok) - warmup)}


def train_log_tail(run_dir: Path, n: int = 40) -> str:
    p = run_dir / "train.log"
    return "\n".join(p.read_text(errors="replace").splitlines()[-n:]) if p.exists() else ""


def run_to_end(cfg: Any, runs: Path, timeout: float) -> tuple[str, dict[str, Any], dict[str, Any]]:
    from phi3_lora import jobs

    t0 = time.time()
    with GpuSampler() as sampler:
        run_id = jobs.start_run(cfg, runs, need_bytes=0)
        status = jobs.wait_for(run_id, runs, timeout=timeout, poll=1.0)
        end = time.time() + 120
        while jobs.active_run(runs) and time.time() < end:  # the end event comes before the processes exit
            time.sleep(0.5)
    r = read_run(runs / run_id)
    r["state"], r["wall_s"], r["gpu_procs"] = status.state, time.time() - t0, sampler.summary()
    return run_id, r, {"log": train_log_tail(runs / run_id)}


def stop_mid_run(cfg: Any, runs: Path, after_step: int, timeout: float) -> dict[str, Any]:
    from phi3_lora import events, jobs
    from phi3_lora.runs import RunDir, pid_alive

    out: dict[str, Any] = {}
    with GpuSampler() as sampler:
        run_id = jobs.start_run(cfg, runs, need_bytes=0)
        deadline = time.time() + timeout
        while time.time() < deadline and events.run_status(runs / run_id).step < after_step:
            if not events.run_status(runs / run_id).active:
                break
            time.sleep(0.5)
        pid = RunDir(runs / run_id).read_process().pid
        tree = [pid, *jobs.descendants(pid)] if pid else []
        out["before"] = [proc_info(p) for p in tree]
        out["step_at_signal"] = events.run_status(runs / run_id).step
        t0 = time.time()
        st = jobs.stop_run(run_id, runs)
        out["stop_seconds"] = time.time() - t0
        out["alive_after"] = [p for p in tree if pid_alive(p)]
        time.sleep(2)
        out["gpu_apps_after"] = smi("pid,gpu_uuid,used_memory")
    ck = RunDir(runs / run_id).last_checkpoint()
    out.update(state=st.state, checkpoint=str(ck) if ck else None,
               checkpoint_files=sorted(p.name for p in ck.iterdir()) if ck else [],
               run=read_run(runs / run_id), gpu_procs=sampler.summary(), log=train_log_tail(runs / run_id, 60),
               sigkill_needed=out["stop_seconds"] >= jobs.STOP_GRACE_SECONDS)
    return out


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    n = min(len(a["loss"]), len(b["loss"]))
    diffs = [abs(x - y) for x, y in zip(a["loss"][:n], b["loss"][:n])]
    rel = [d / abs(x) for d, x in zip(diffs, a["loss"][:n]) if x]
    return {"steps": n, "same_tokens_each_step": a["tokens_seen"][:n] == b["tokens_seen"][:n],
            "mean_abs_diff": sum(diffs) / n if n else None, "max_abs_diff": max(diffs) if diffs else None,
            "mean_rel_diff": sum(rel) / len(rel) if rel else None, "max_rel_diff": max(rel) if rel else None,
            "loss_first_last_1gpu": [a["loss"][0], a["loss"][n - 1]] if n else None,
            "loss_first_last_ngpu": [b["loss"][0], b["loss"][n - 1]] if n else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--per-device", type=int, default=4, help="Per-device batch on the several-GPU run.")
    p.add_argument("--one-per-device", type=int, default=None,
                   help="Per-device batch of the 1-GPU run; default gpus x per-device (same global batch). "
                        "Set it to --per-device for weak scaling (same work per GPU).")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="Logged steps left out of tokens/s.")
    p.add_argument("--rows", type=int, default=2000, help="Conversations in the chat-length mix.")
    p.add_argument("--stop-after", type=int, default=4, help="Stop test: SIGTERM once this step is logged.")
    p.add_argument("--skip", nargs="*", default=[], choices=("one", "many", "stop"))
    p.add_argument("--workdir", default="/tmp/phi3_lora_multi_gpu")
    p.add_argument("--tokenizer", default=str(ROOT / ".bench" / "phi3_tokenizer"))
    p.add_argument("--out", default=".")
    args = p.parse_args(argv)

    os.environ.update(SAFE_ENV)  # children inherit them (jobs passes os.environ on)
    sys.path.insert(0, str(ROOT))
    import torch

    from bench.chat_mix import chat_rows, write_jsonl
    from bench.machine import versions
    from bench.model_folders import make_phi3_mini

    out_dir, work = Path(args.out), Path(args.workdir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "versions": versions(),
                              "gpus_visible": torch.cuda.device_count(), "args": vars(args),
                              "bench_pid": os.getpid()}
    logs: dict[str, str] = {}

    def dump() -> None:
        (out_dir / "multi_gpu.json").write_text(json.dumps(report, indent=1, default=str))
        (out_dir / "train_logs.txt").write_text("\n\n".join(f"===== {k}\n{v}" for k, v in logs.items()))

    t0 = time.time()
    model_dir = make_phi3_mini(work / "phi3-mini-random", Path(args.tokenizer))
    data = write_jsonl(chat_rows("mix", args.rows), work / "mix.jsonl")
    report["model_seconds"] = time.time() - t0
    torch.cuda.empty_cache()
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    g, b = args.gpus, args.per_device
    print("model ready", report["model_seconds"], flush=True)

    if "one" not in args.skip:
        cfg = make_config(model_dir, data, 1, args.one_per_device or g * b, args.steps, 10**6, 0.0)
        run_id, r, extra = run_to_end(cfg, runs, 600)
        r.update(throughput(r, args.warmup))
        report["one_gpu"], logs["one_gpu"] = r, extra["log"]
        print("1 GPU:", json.dumps({k: r.get(k) for k in ("state", "tokens_per_s", "wall_s")}), flush=True)
        dump()
    if "many" not in args.skip:
        cfg = make_config(model_dir, data, g, b, args.steps, args.steps, 0.0)
        run_id, r, extra = run_to_end(cfg, runs, 600)
        r.update(throughput(r, args.warmup))
        ck = runs / run_id / "checkpoints" / f"checkpoint-{args.steps}"
        r["checkpoint_files"] = sorted(p.name for p in ck.iterdir()) if ck.exists() else None
        r["adapter_files"] = sorted(p.name for p in (runs / run_id / "adapter").iterdir()) \
            if (runs / run_id / "adapter").exists() else None
        report["n_gpu"], logs["n_gpu"] = r, extra["log"]
        print(f"{g} GPUs:", json.dumps({k: r.get(k) for k in ("state", "tokens_per_s", "wall_s")}), flush=True)
        if "one_gpu" in report:
            report["scaling"] = r["tokens_per_s"] / report["one_gpu"]["tokens_per_s"]
            report["loss_compare"] = compare(report["one_gpu"], r)
            print("scaling", report["scaling"], "loss", report["loss_compare"], flush=True)
        dump()
    if "stop" not in args.skip:
        cfg = make_config(model_dir, data, g, b, 10**4, 10**6, 0.05)
        s = stop_mid_run(cfg, runs, args.stop_after, 300)
        logs["stop"] = s.pop("log")
        report["stop"] = s
        print("stop:", json.dumps({k: s.get(k) for k in ("state", "stop_seconds", "alive_after", "checkpoint",
                                                         "sigkill_needed")}), flush=True)
        dump()
    dump()
    return 0


if __name__ == "__main__":
    sys.exit(main())
