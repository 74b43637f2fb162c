"""A leaner forward for peft's LoRA Linear layers under mixed precision: the base output plus one `addmm`.

peft's LoRA forward (`peft.tuners.lora.layer.Linear` and `.bnb.Linear4bit`) computes

    result = base(x)            # 4-bit: then result = result.clone() ("defensively")
    out = lora_B(lora_A(dropout(x))) * scaling
    result = result + out

which makes four full-width passes over each adapted layer's output (the clone, lora_B's product, the
scale, the add) and, in the backward pass, two more (the scale's gradient and the add). On an H200
profile of a Phi-3-mini QLoRA step, copies, adds and scalings together took 88 ms against 54 ms of
attention (docs/benchmarks.md). Here the rank-r product, the scale and the add are one GEMM with an
epilogue:

    out = torch.addmm(result, lora_A(dropout(x)), lora_B.weight.T, alpha=scaling)

It is the same function (only the rounding order of the bf16 sum differs), autograd derives the same
gradients, the adapter weights stay peft's own modules (so saving, merging and loading are untouched),
and every case this forward does not cover goes to peft's: several active adapters, a merged or
disabled adapter, DoRA and other variants, a LoRA bias, mixed-batch `adapter_names`, and any call
without autocast (where peft casts the input to the adapter's dtype; we keep that behaviour exactly).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

_ORIGINAL = "_peft_forward"


def lora_linear_classes() -> tuple[type, ...]:
    """peft's LoRA Linear layers whose forward this module reproduces (plain and bitsandbytes 4-bit)."""
    from peft.tuners.lora.layer import Linear

    classes: list[type] = [Linear]
    try:
        from peft.tuners.lora.bnb import Linear4bit

        classes.append(Linear4bit)
    except ImportError:  # bitsandbytes missing: only 16-bit layers exist
        pass
    return tuple(classes)


def lean_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """LoRA forward as base(x) + scaling * B(A(dropout(x))) in one addmm; peft's forward for anything else."""
    active = self.active_adapters
    if args or kwargs or self.disable_adapters or self.merged or len(active) != 1:
        return getattr(self, _ORIGINAL)(x, *args, **kwargs)
    name = active[0]
    if (name not in self.lora_A or name in self.lora_variant or self.lora_B[name].bias is not None
            or not torch.is_autocast_enabled(x.device.type)):
        return getattr(self, _ORIGINAL)(x, *args, **kwargs)
    result = self.base_layer(x)
    h = self.lora_A[name](self.lora_dropout[name](x))
    flat = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]),
                       self.lora_B[name].weight.t(), alpha=self.scaling[name])
    return flat.view(result.shape)


def install(model: nn.Module) -> int:
    """Give every peft LoRA Linear in `model` the lean forward (idempotent); returns how many layers changed."""
    classes = lora_linear_classes()
    count = 0
    for module in model.modules():
        if isinstance(module, classes) and not hasattr(module, _ORIGINAL):
            setattr(module, _ORIGINAL, module.forward)
            module.forward = types.MethodType(lean_forward, module)
            count += 1
    return count


def uninstall(model: nn.Module) -> int:
    """Put peft's own forward back on every layer `install` changed; returns how many."""
    count = 0
    for module in model.modules():
        if hasattr(module, _ORIGINAL):
            del module.forward  # the instance attribute; the class's forward shows through again
            delattr(module, _ORIGINAL)
            count += 1
    return count
