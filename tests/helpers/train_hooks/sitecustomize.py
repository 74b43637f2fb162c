"""Test-only faults and slowness for training processes, kept out of the library.

Python imports `sitecustomize` at start-up from sys.path (only the first one it finds), so a process started
with this folder on PYTHONPATH (the `train_hooks` fixture in tests/conftest.py puts it there; child processes
inherit it) runs this file before anything else. With one of the variables below set it patches
transformers' Trainer, which phi3_lora's trainer subclasses, so the real training code path meets the fault:

- PHI3_LORA_TEST_SLOW_SAVE_SECONDS: pause inside each checkpoint save, between the adapter and the optimizer
  state (a kill in the pause leaves a half-written save);
- PHI3_LORA_TEST_MEMORY_LIMIT_MB: when the training loop starts, cap the address space (RLIMIT_AS) at what
  the process has mapped plus that many MB, so the loop's first big allocation fails like a real OOM;
- PHI3_LORA_TEST_STEP_SECONDS: each optimizer step takes at least this long (a loaded machine: issue 13
  item 7 saw ~40 s steps on a busy CPU);
- PHI3_LORA_TEST_SAVE_SECONDS: each whole checkpoint save takes at least this long.
"""

from __future__ import annotations

import os

SLOW_SAVE_ENV = "PHI3_LORA_TEST_SLOW_SAVE_SECONDS"
MEMORY_LIMIT_ENV = "PHI3_LORA_TEST_MEMORY_LIMIT_MB"
STEP_ENV = "PHI3_LORA_TEST_STEP_SECONDS"
SAVE_ENV = "PHI3_LORA_TEST_SAVE_SECONDS"
ALL_ENV = (SLOW_SAVE_ENV, MEMORY_LIMIT_ENV, STEP_ENV, SAVE_ENV)


def _seconds(name: str) -> float:
    return float(os.environ.get(name, "0") or 0)


def _cap_address_space(extra_mb: float) -> None:
    import resource

    with open("/proc/self/statm", encoding="ascii") as fh:
        mapped = int(fh.read().split()[0]) * resource.getpagesize()
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + int(extra_mb * 2**20), hard))


def _install() -> None:
    import time

    from transformers import Trainer

    save_state, train = Trainer._save_optimizer_and_scheduler, Trainer.train
    step, save = Trainer.training_step, Trainer._save_checkpoint

    def slow_save_state(self, output_dir):  # type: ignore[no-untyped-def]
        time.sleep(_seconds(SLOW_SAVE_ENV))
        return save_state(self, output_dir)

    def limited_train(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        limit = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
        if limit:
            _cap_address_space(float(limit))
        return train(self, *args, **kwargs)

    def slow_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(_seconds(STEP_ENV))
        return step(self, *args, **kwargs)

    def slow_save(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(_seconds(SAVE_ENV))
        return save(self, *args, **kwargs)

    Trainer._save_optimizer_and_scheduler = slow_save_state
    Trainer.train = limited_train
    Trainer.training_step = slow_step
    Trainer._save_checkpoint = slow_save


if any(os.environ.get(name) for name in ALL_ENV):
    _install()
