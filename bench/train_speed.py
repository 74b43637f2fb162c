"""Training and generation speed: the cookbook recipe, our engine and Unsloth, on the same data and model.

    python -m bench.train_speed                 # GPU: the main rows, writes docs/benchmarks.md
    python -m bench.train_speed --cpu           # this machine: the embedded model, briefly, with a recipe row
    python -m phi3_lora bench [--cpu]           # the same, through the app's CLI

GPU rows use a Phi-3-mini-shaped model with random weights (transformers Phi3Config: hidden 3072,
32 layers, 32 heads, intermediate 8192, vocab 32064) and the real Phi-3 tokenizer, built from
tests/assets/ggml-vocab-phi-3.gguf on first use, so no download is needed. Data: full rows (every row cut
at 2048 tokens) and a chat-length mix (lognormal token counts, median 300, mean 430). "Useful tokens" are
non-padding tokens. MFU counts 16.2 GFLOP per trained token (forward + input gradients of a 3.8B model at
2048 context) against 790 TFLOP/s, the bf16 matrix rate measured on an H200.

Recipe rows build trl's SFTTrainer as the Phi-3 model card's sample_finetune.py does (peft_config handed to
the trainer, which prepares the 4-bit model itself). Engine rows build the trainer through
`phi3_lora.train.build`, the same function `python -m phi3_lora train` uses. Unsloth rows run
bench/peer_unsloth.py with `--peer-path` put first on PYTHONPATH (Unsloth and its own pins, never a
dependency of this project). Every row runs in a fresh process (so no row's patches or compiled kernels
reach another, and the order does not matter), at the same learning rate (1e-4, constant, no warm-up),
with the loss of every step kept, and is timed by bench/timing.py: warm-up until the step time settles,
then the median step.

This module is the command line and the GPU run's order of work (set-up, checks, the rows, generation, profiles,
tables). The parts: the rows and sets (row_sets.py), which runs a call does (schedule.py), the data (chat_mix.py),
the model and tokenizer folders (model_folders.py), a row's trainer (row_trainers.py) and its process
(row_process.py), timing (timing.py), the GPU checks (gpu_checks.py), generation (generation.py), the step profile
(step_profile.py), versions and host link (machine.py), the tables (report.py, paired.py) and `--cpu`
(cpu_speed.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.chat_mix import bench_data
from bench.cpu_speed import cpu_main
from bench.generation import explore_generation, save_random_adapter, time_generation
from bench.gpu_checks import check_dropout_lora_gpu, check_packed_gpu
from bench.machine import host_link, versions
from bench.model_folders import ensure_tokenizer, make_llama_copy, make_phi3_mini
from bench.paired import paired_table
from bench.report import aggregate, table, write_gpu_markdown
from bench.row_process import collect, measure_in_process, one_row_main, spawn
from bench.row_sets import all_rows, named, ordered_rows
from bench.schedule import done_runs, pending_runs, run_series
from bench.step_profile import profile_step
from bench.timing import release_memory

ROOT = Path(__file__).resolve().parents[1]


def gpu_main(args: argparse.Namespace) -> int:
    began = time.time()  # --time-budget counts from here: the set-up (model, data, checks) spends it too
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = ensure_tokenizer(Path(args.tokenizer))
    model_dir = make_phi3_mini(work / "phi3-mini-random", tok_dir)
    rows = ordered_rows(args.rows, args.set)
    if any(r.kind == "unsloth" and r.peer.get("model") == "llama" for r in rows):
        make_llama_copy(model_dir, work / "llama-mini-random")
    bench_data(work)
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "versions": versions(), "runs": [], "gen": {},
                              "host_link": host_link(), "order": []}
    print("host link:", report["host_link"], flush=True)
    log = Path(args.json)

    def dump() -> None:
        report["rows"] = aggregate(report["runs"])
        log.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")

    if not args.no_check:
        for key, check in (("packed_check", lambda: check_packed_gpu(model_dir)),
                           ("dropout_lora_check", check_dropout_lora_gpu)):
            try:
                report[key] = check()
            except Exception as exc:  # noqa: BLE001
                report[key] = {"error": f"{type(exc).__name__}: {exc}"}
            print(key, report[key], flush=True)
        release_memory()
    deadline = began + args.time_budget if args.time_budget else None
    done, history = done_runs(args.done_dir or [])
    pending = pending_runs(rows, args.first_repeat, args.repeats, done, args.last)
    if done:
        print(f"{len(done)} runs done in earlier calls; {len(pending)} to go", flush=True)

    def seconds_left() -> float | None:
        return args.deadline_epoch - time.time() if args.deadline_epoch else None

    def on_result(r: dict[str, Any]) -> None:
        report["order"].append(r["name"])
        print(json.dumps({k: v for k, v in r.items() if k in (
            "name", "tokens_per_s", "peak_gib", "tokens_per_step", "warmup_steps", "settled", "step_s_median",
            "step_tok_s_min", "step_tok_s_max", "error", "wall_s", "process_s", "import_overlap_s")},
            default=str), flush=True)
        dump()

    run_series(pending, history, report["runs"], lambda row, pre: spawn(row, args, work, prestart=pre), collect,
               prestart=args.prestart, row_timeout=args.row_timeout, seconds_left=seconds_left,
               stopped=lambda: bool(deadline and time.time() > deadline), on_result=on_result)
    if pending:
        print("time budget spent: left for a later call:", [f"{r.name} #{rep}" for r, rep in pending], flush=True)
    dump()
    measures = ([("gen", lambda d, a, b: time_generation(str(d), a, b))] if args.gen else []) + (
        [("gen_explore", explore_generation)] if args.gen_explore else [])
    for key, measure_gen in measures:
        for four_bit in (True, False):
            label = f"Phi-3-mini shape, {'QLoRA 4-bit' if four_bit else '16-bit'}"
            try:
                adapter = save_random_adapter(model_dir, work / f"adapter-{int(four_bit)}", four_bit)
                report.setdefault(key, {})[label] = measure_gen(model_dir, adapter, four_bit)
            except Exception as exc:  # noqa: BLE001
                report.setdefault(key, {})[label] = [{"error": f"{type(exc).__name__}: {exc}"}]
            print(key, label, report[key][label], flush=True)
            dump()
    print(table(report["rows"]))
    for i, name in enumerate(args.profile or []):
        prow = [r for r in all_rows() if named(r, name)]
        if not prow:
            continue
        out = Path(args.json).with_suffix(f".profile{i}.txt")
        if prow[0].kind == "unsloth":  # in Unsloth's own process and packages, as its timed rows
            measure_in_process(prow[0], args, work, extra=["--profile", str(out), "--profile-step", "6"])
            print(out.read_text(encoding="utf-8") if out.exists() else f"no profile: {prow[0].name}", flush=True)
        else:
            data = {"full": work / "full.jsonl", "mix": work / "mix.jsonl"}
            print(profile_step(prow[0], model_dir, data, 6, out), flush=True)
    if args.markdown and report["runs"]:  # a call of profiles only has no table
        write_gpu_markdown(report, args)
    return 0


def merge_main(args: argparse.Namespace) -> int:
    """Several GPU runs' JSON (the same session's calls) as one table: every run of a row is a repeat."""
    reports = [json.loads(Path(f).read_text(encoding="utf-8")) for f in args.merge]
    report = dict(reports[0], runs=[r for rep in reports for r in rep["runs"]])
    report["rows"] = aggregate(report["runs"])
    Path(args.json).write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    print(table(report["rows"]))
    print(paired_table(report["runs"]))
    if args.markdown and report["runs"]:  # a call of profiles only has no table
        write_gpu_markdown(report, args)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu", action="store_true", help="Measure the embedded model on this machine's CPU.")
    p.add_argument("--rows", nargs="*", help="Only rows whose name contains one of these words ('=NAME': that row).")
    p.add_argument("--set", default=["main"], nargs="+", choices=("main", "ablations", "all", "explore", "free"),
                   help="main: recipe, engine, Unsloth and 16-bit rows at each memory budget; ablations: the "
                        "engine with one technique turned back; explore: tuning rows.")
    p.add_argument("--steps", type=int, default=6, help="Timed steps per row (after the warm-up settles).")
    p.add_argument("--repeats", type=int, default=2, help="Runs of the row list (odd ones in reverse order).")
    p.add_argument("--first-repeat", type=int, default=0, help="Number the repeats from here (a later call).")
    p.add_argument("--merge", nargs="+", help="Merge these GPU result files into one table (no GPU needed).")
    p.add_argument("--time-budget", type=float, default=0,
                   help="Start no row once this many seconds have passed since the bench began.")
    p.add_argument("--row-timeout", type=float, default=900)
    p.add_argument("--done-dir", nargs="*",
                   help="Folders of earlier calls' result JSON (this device session): their runs are not run again "
                        "and their process times decide which rows fit this call.")
    p.add_argument("--deadline-epoch", type=float, default=0,
                   help="Unix time the call must end by: a row starts only if its expected time fits, and is "
                        "killed at the deadline.")
    p.add_argument("--last", nargs="*", help="Rows (names as in --rows) to run after every other run.")
    p.add_argument("--engine-patch", nargs="*", metavar="NAME=VALUE",
                   help="Set these module attributes in every engine row's process (VALUE as JSON), e.g. "
                        "phi3_lora.options.CUDNN_RAGGED=true: the whole table with a switch an explore row won.")
    p.add_argument("--no-prestart", dest="prestart", action="store_false",
                   help="Start each row's process only when the one before has ended (by default the next one "
                        "does its imports meanwhile, bench/prestart.py).")
    p.add_argument("--peer-path", default=os.environ.get("PEER_PYTHONPATH", ""),
                   help="Folder with Unsloth and its pins, put first on PYTHONPATH for the Unsloth rows.")
    p.add_argument("--cpu-steps", type=int, default=6)
    p.add_argument("--cpu-no-gen", action="store_true", help="With --cpu: training rows only.")
    p.add_argument("--cpu-bf16-recipe", action="store_true",
                   help="With --cpu: also the recipe in bf16 where the engine picked fp32 (slow without native bf16).")
    p.add_argument("--cpu-gen", action="store_true",
                   help="With --cpu: only Compare's generation (base, tuned, the pair; random adapter), 3 runs each.")
    p.add_argument("--cpu-gen-tokens", type=int, default=64)
    p.add_argument("--profile", nargs="*", help="Profile one step of the first row whose name contains each word.")
    p.add_argument("--gen", action="store_true", help="Also time generation (GPU).")
    p.add_argument("--gen-explore", action="store_true",
                   help="Also try faster decoding (static cache, torch.compile, merged adapter) with plain generate.")
    p.add_argument("--no-check", action="store_true", help="Skip the packed-attention check on the GPU.")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "phi3_lora_bench"))
    p.add_argument("--tokenizer", default=str(ROOT / ".bench" / "phi3_tokenizer"),
                   help="Folder with the Phi-3 tokenizer (made from tests/assets/ggml-vocab-phi-3.gguf if missing).")
    p.add_argument("--json", default="bench_results.json")
    p.add_argument("--markdown", default=str(ROOT / "docs" / "benchmarks.md"),
                   help="Write the table into this file ('' to skip).")
    p.add_argument("--one-row", help=argparse.SUPPRESS)  # internal: run this row here, write --row-json
    p.add_argument("--row-json", help=argparse.SUPPRESS)
    p.add_argument("--go-file", help=argparse.SUPPRESS)  # internal: import, then wait for this file (prestart.py)


def run(args: argparse.Namespace) -> int:
    if args.one_row:
        return one_row_main(args)
    if args.merge:
        return merge_main(args)
    return cpu_main(args) if args.cpu else gpu_main(args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    code = main()
    if "--one-row" in sys.argv:  # a row's process: its result is written; skip tearing down the model and CUDA
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
