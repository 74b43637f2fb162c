"""Experiment trackers (`train.report_to`): which ones, whether they are installed, where they write, and how
to open their dashboards.

transformers' own callbacks do the logging (report_to is passed through to TrainingArguments); this module
only checks the optional packages up front (a missing one is a UserError with its pip line, not an ImportError
deep inside the trainer) and points each tracker's local files into the run folder where the tracker allows it:
  tensorboard  runs/<id>/tensorboard/           (TENSORBOARD_LOGGING_DIR)
  trackio      project "phi3_lora", run <id>     ($TRACKIO_DIR, default ~/.cache/huggingface/trackio)
  mlflow       runs/<id>/mlruns/ unless MLFLOW_TRACKING_URI is set
  wandb        project "phi3_lora" unless WANDB_PROJECT is set; local files in runs/<id>/ (WANDB_DIR)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shlex
from pathlib import Path
from typing import Any, Iterator

from phi3_lora.errors import UserError

TRACKERS = ("none", "tensorboard", "trackio", "wandb", "mlflow")
PROJECT = "phi3_lora"
# tracker -> (module that must import, the pip line that installs it; pinned where the tests use it)
PACKAGES = {
    "tensorboard": ("tensorboard", "pip install tensorboard==2.21.0"),
    "trackio": ("trackio", "pip install trackio==0.43.0"),
    "wandb": ("wandb", "pip install wandb"),
    "mlflow": ("mlflow", "pip install mlflow"),
}
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"


def normalize(value: Any) -> list[str]:
    """`train.report_to` as a list of tracker names; [] means none. Accepts a list, or one name, or names
    separated by commas (pure)."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    names = [str(v).strip().lower() for v in items if str(v).strip()]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise UserError(f"train.report_to has unknown tracker(s) {unknown}.",
                        hint=f"Choose from {', '.join(TRACKERS)} (several allowed, e.g. [tensorboard, trackio]).")
    if "none" in names and len(names) > 1:
        raise UserError("train.report_to lists 'none' together with trackers.", hint="Use [] / none, or the trackers.")
    return [n for n in dict.fromkeys(names) if n != "none"]


def missing_packages(trackers: list[str]) -> list[str]:
    return [t for t in trackers if importlib.util.find_spec(PACKAGES[t][0]) is None]


def require_installed(trackers: list[str]) -> None:
    """A UserError naming each missing tracker package and the pip line that installs it."""
    missing = missing_packages(trackers)
    if missing:
        lines = "; ".join(PACKAGES[t][1] for t in missing)
        raise UserError(f"train.report_to asks for {', '.join(missing)}, but the package is not installed.",
                        hint=f"Install it ({lines}) or remove it from train.report_to.")


def report_to_arg(trackers: list[str]) -> str | list[str]:
    """What TrainingArguments.report_to gets (pure)."""
    return trackers or "none"


def environment(trackers: list[str], run_dir: Path) -> dict[str, str]:
    """Environment variables that put each tracker's local files in the run folder (pure; user settings win)."""
    env: dict[str, str] = {}
    if "tensorboard" in trackers:
        env["TENSORBOARD_LOGGING_DIR"] = str(run_dir / TENSORBOARD_DIR)
    if "mlflow" in trackers and not os.environ.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = (run_dir / MLFLOW_DIR).resolve().as_uri()
    if "wandb" in trackers:
        env.setdefault("WANDB_DIR", str(run_dir))
        if not os.environ.get("WANDB_PROJECT"):
            env["WANDB_PROJECT"] = PROJECT
    return env


@contextlib.contextmanager
def environment_set(trackers: list[str], run_dir: Path) -> Iterator[None]:
    """Set `environment()` for the trainer's lifetime and put the old values back afterwards."""
    env = environment(trackers, run_dir)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def dashboards(trackers: list[str], run_dir: Path) -> list[tuple[str, str]]:
    """(tracker, the command or link that opens its dashboard for this run), for the Train tab (pure)."""
    run = shlex.quote(str(run_dir))
    out: list[tuple[str, str]] = []
    for t in trackers:
        if t == "tensorboard":
            out.append((t, f"tensorboard --logdir {shlex.quote(str(run_dir / TENSORBOARD_DIR))}   "
                           "# then open http://localhost:6006"))
        elif t == "trackio":
            out.append((t, f"trackio show --project {PROJECT}   # run {run_dir.name}"))
        elif t == "mlflow":
            uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / MLFLOW_DIR).resolve().as_uri()
            out.append((t, f"mlflow ui --backend-store-uri {shlex.quote(uri)}   # then open http://127.0.0.1:5000"))
        elif t == "wandb":
            project = os.environ.get("WANDB_PROJECT") or PROJECT
            out.append((t, f"https://wandb.ai/home (project {project}; the run's own link is in {run}/train.log)"))
    return out
