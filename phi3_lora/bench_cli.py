"""`python -m phi3_lora bench ...`: the checkout's bench (bench/train_speed.py), run as `python -m bench.train_speed`
from the checkout root in a child process, so nothing here edits sys.path (the bench starts its own processes per
row and imports `bench.*` itself). Not registered in an installed package without bench/."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "train_speed.py"


def register(sub: argparse._SubParsersAction) -> None:
    if not BENCH.is_file():
        return
    p = sub.add_parser("bench", add_help=False,
                       help="Training/generation speed: recipe vs engine (GPU) or the embedded model (--cpu).",
                       description="Runs python -m bench.train_speed from the checkout; `bench --help` lists its "
                                   "options.")
    p.set_defaults(func=run, pass_through=True)  # every argument goes to the bench (cli.main)


def run(args: argparse.Namespace) -> int:
    return subprocess.call([sys.executable, "-m", "bench.train_speed", *args.extra], cwd=ROOT)
