"""Test-only faults for training processes, kept out of the library.

Python imports `sitecustomize` at start-up from sys.path, so a process started with this folder on
PYTHONPATH (the `fault_hooks` fixture in tests/conftest.py puts it there; child processes inherit it)
runs this file before anything else. With one of the variables below set it patches transformers'
Trainer, which phi3_lora's trainer subclasses, so the real training code path meets the fault:

- PHI3_LORA_TEST_SLOW_SAVE_SECONDS: pause inside each checkpoint save, between the adapter and the optimizer
  state (a kill in the pause leaves a half-written save);
- PHI3_LORA_TEST_MEMORY_LIMIT_MB: when the training loop starts, cap the address space (RLIMIT_AS) at what
  the process has mapped plus that many MB, so the loop's first big allocation fails like a real OOM.
"""

from __future__ import annotations

import os

SLOW_SAVE_ENV = "PHI3_LORA_TEST_SLOW_SAVE_SECONDS"
MEMORY_LIMIT_ENV = "PHI3_LORA_TEST_MEMORY_LIMIT_MB"


def _cap_address_space(extra_mb: float) -> None:
    import resource

    with open("/proc/self/statm", encoding="ascii") as fh:
        mapped = int(fh.read().split()[0]) * resource.getpagesize()
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + int(extra_mb * 2**20), hard))


def _install() -> None:
    import time

    from transformers import Trainer

    save, train = Trainer._save_optimizer_and_scheduler, Trainer.train

    def slow_save(self, output_dir):  # type: ignore[no-untyped-def]
        delay = float(os.environ.get(SLOW_SAVE_ENV, "0") or 0)
        if delay:
            time.sleep(delay)
        return save(self, output_dir)

    def limited_train(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        limit = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
        if limit:
            _cap_address_space(float(limit))
        return train(self, *args, **kwargs)

    Trainer._save_optimizer_and_scheduler = slow_save
    Trainer.train = limited_train


if os.environ.get(SLOW_SAVE_ENV) or os.environ.get(MEMORY_LIMIT_ENV):
    _install()
