"""A module's forward replaced per instance and put back: the one way the speed path patches a layer.

The replacement is an instance attribute (a bound method), so the class's forward shows through again once it is
deleted; `mark` names the attribute that keeps the original and says the layer is patched (idempotent).
"""

from __future__ import annotations

import types
from typing import Any, Callable

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
