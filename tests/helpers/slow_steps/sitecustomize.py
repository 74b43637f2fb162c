"""Test-only slow steps and saves for training processes, kept out of the library.

Python imports `sitecustomize` at start-up from sys.path; a process started with this folder on PYTHONPATH
(child processes inherit it) runs this file first. With the variables below set it patches transformers'
Trainer, which phi3_lora's trainer subclasses, so the real training code path is slow the way a loaded
machine makes it (issue 13 item 7: ~40 s steps on a busy CPU):

- PHI3_LORA_TEST_STEP_SECONDS: each optimizer step takes at least this long;
- PHI3_LORA_TEST_SAVE_SECONDS: each checkpoint save takes at least this long.
"""

from __future__ import annotations

import os

STEP_ENV = "PHI3_LORA_TEST_STEP_SECONDS"
SAVE_ENV = "PHI3_LORA_TEST_SAVE_SECONDS"


def _install() -> None:
    import time

    from transformers import Trainer

    step, save = Trainer.training_step, Trainer._save_checkpoint

    def slow_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(float(os.environ.get(STEP_ENV) or 0))
        return step(self, *args, **kwargs)

    def slow_save(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(float(os.environ.get(SAVE_ENV) or 0))
        return save(self, *args, **kwargs)

    Trainer.training_step = slow_step
    Trainer._save_checkpoint = slow_save


if os.environ.get(STEP_ENV) or os.environ.get(SAVE_ENV):
    _install()
