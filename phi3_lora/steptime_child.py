"""The child process `steptime.measure` starts: a few steps of the run's own trainer, timed here.

Its own module so that the step-time cache (steptime.py, which train.py writes a finished run's step time
into) never imports the trainer: train -> steptime, and this child -> train, steptime.

    python -m phi3_lora.steptime_child CONFIG.yaml RUNS_DIR
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from phi3_lora import events, train
from phi3_lora.config import RunConfig, load_yaml
from phi3_lora.errors import UserError
from phi3_lora.steptime import TIMED_STEPS, record, seconds_per_step


def _time_steps(config: RunConfig, runs_dir: Path) -> float:
    """In the child: TIMED_STEPS + 1 steps of the run's own trainer on the run's data; seconds per step."""
    short = config.replace(train={"max_steps": TIMED_STEPS + 1, "save_steps": 10**6, "logging_steps": 1,
                                  "eval_steps": None}, data={"eval_fraction": 0.0})
    train.quiet_libraries()
    with tempfile.TemporaryDirectory(dir=runs_dir, prefix=".measure-run-") as out:
        built = train.build(short, Path(out))
        built.trainer.train()
        value = seconds_per_step(events.read_events(Path(out)))
    if value is None:
        raise UserError("The timed steps logged no step times.")
    return value


def main(argv: list[str] | None = None) -> int:
    config_path, runs_dir = (argv if argv is not None else sys.argv[1:])[:2]
    config = load_yaml(config_path)
    try:
        value = _time_steps(config, Path(runs_dir))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    record(Path(runs_dir), config, value, f"{TIMED_STEPS} timed steps")
    print(f"{value:.3f} s per step", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
