"""A module's forward replaced per instance and put back: the one way the code patches a layer's forward.

The replacement is an instance attribute, so the class's forward shows through again once it is deleted. Two
forms: `replace` / `restore` for a patch that lives as long as the model (lean_lora, the 16-bit copies; `mark`
names the attribute that keeps the original and says the layer is patched, idempotent), and `swapped` for one
call's duration (packed CPU weights, Compare's row routing), which puts back whatever the layer had before.
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

if TYPE_CHECKING:  # torch stays out of the import of this module (the app's start-up imports it lazily)
    from torch import nn


def replace(module: nn.Module, forward: Callable[..., Any], mark: str) -> bool:
    """Give `module` `forward` (bound to it) unless `mark` says it has it already; True when it changed."""
    if hasattr(module, mark):
        return False
    setattr(module, mark, module.forward)
    module.forward = types.MethodType(forward, module)
    return True


def restore(module: nn.Module, mark: str) -> bool:
    """Put the class's forward back where `replace` changed it; True when it did."""
    if not hasattr(module, mark):
        return False
    del module.forward
    delattr(module, mark)
    return True


@contextlib.contextmanager
def swapped(modules: Iterable[nn.Module], forward: Callable[..., Any]) -> Iterator[None]:
    """Each of `modules` runs `forward(module, *args, **kwargs)` for the duration, then what it ran before (its
    class's forward, or an instance forward a longer-lived patch gave it)."""
    modules = list(modules)
    before = [m.__dict__.get("forward") for m in modules]
    try:
        for m in modules:
            m.forward = functools.partial(forward, m)
        yield
    finally:
        for m, previous in zip(modules, before):
            if previous is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = previous
