"""`python -m phi3_lora bench`: training and generation speed (bench/train_speed.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:  # bench/ sits beside the package in a checkout
        sys.path.insert(0, root)
    try:
        from bench import train_speed
    except ImportError:  # an installed package without the checkout's bench/ folder
        return
    p = sub.add_parser("bench", help="Training/generation speed: recipe vs engine (GPU) or the embedded model (--cpu).")
    train_speed.add_arguments(p)
    p.set_defaults(func=train_speed.run)
