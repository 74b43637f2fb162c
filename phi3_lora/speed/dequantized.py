"""Frozen 4-bit base weights kept dequantized in 16-bit where a memory budget has room for them.

bitsandbytes' 4-bit Linear dequantises its NF4 weight on every call: once in the forward pass and once more in
the backward pass (`MatMul4Bit`), then multiplies in the compute dtype. The base weights are frozen in LoRA
training, so that dequantised copy is the same tensor at every step. Where the budget holds it (a whole H200
keeps every layer's activations and still has ~100 GiB free; Phi-3-mini's copies take 6.8 GiB), this module
dequantises each chosen layer's weight once, with bitsandbytes' own function, and the layer multiplies by that
copy: the same values, the same `linear`, so the same outputs and gradients (tests/test_dequantized.py), minus
two dequantisation kernels per layer and step, and a plain matmul that torch.compile sees instead of a custom op.

The 4-bit weight itself stays where it is: the adapter is saved, merged and exported from the 4-bit model as
before (the copies are non-persistent buffers, in no state dict). `options.dequantized_layers` decides how many
layers get a copy (only after every activation is kept: activations buy more speed per byte).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from phi3_lora.speed import bnb_codes, forward_swap

_ORIGINAL = "_phi3_4bit_forward"
_BUFFER = "_phi3_dequantized"


def four_bit_classes() -> tuple[type, ...]:
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes: no 4-bit layers
        return ()
    return (Linear4bit,)


def dequantize(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as bitsandbytes' matmul sees it: dequantised, in the layer's compute dtype."""
    weight = bnb_codes.dense_weight(layer)  # bitsandbytes' dequantize_4bit, after undoing a CPU repacking
    return weight.to(layer.compute_dtype or layer.weight.quant_state.dtype).contiguous()


def dequantized_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' Linear4bit forward with the dequantised copy: linear(x in the compute dtype, W, bias)."""
    weight = getattr(self, _BUFFER)
    bias = None if self.bias is None else self.bias.to(weight.dtype)
    return nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


def install(layers: list[nn.Module]) -> int:
    """Give every bitsandbytes 4-bit Linear inside `layers` (decoder layers) a dequantised copy of its weight and
    the forward that uses it (idempotent). Returns how many Linear layers changed."""
    classes = four_bit_classes()
    if not classes:
        return 0
    count = 0
    for block in layers:
        for module in block.modules():
            if not isinstance(module, classes) or hasattr(module, _ORIGINAL):
                continue
            if getattr(module.weight, "quant_state", None) is None:  # not quantised yet (meta or CPU copy)
                continue
            module.register_buffer(_BUFFER, dequantize(module), persistent=False)
            forward_swap.replace(module, dequantized_forward, _ORIGINAL)
            count += 1
    return count


def uninstall(model: nn.Module) -> int:
    """Drop the copies and put bitsandbytes' forward back (e.g. before merging); returns how many layers."""
    count = 0
    for module in model.modules():
        if forward_swap.restore(module, _ORIGINAL):
            delattr(module, _BUFFER)
            count += 1
    return count


def copy_bytes(layers: list[nn.Module]) -> int:
    """Bytes the dequantised copies of `layers` hold (0 where none is installed)."""
    return sum(getattr(m, _BUFFER).numel() * getattr(m, _BUFFER).element_size()
               for block in layers for m in block.modules() if hasattr(m, _BUFFER))
