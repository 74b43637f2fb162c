"""Decoding on a CPU with the Linear layers' weights pre-packed for oneDNN (float32; bf16 where the CPU has it).

On the 2-core EPYC without native bf16 (the demo's machine: `dtype auto` is float32 there) PyTorch's default
matmul for a few rows (MKL) re-reads and re-packs each weight matrix on every call: a decoding step of the
embedded SmolLM2 took 72 ms for one row, 109 ms for two and 159 ms for 16. oneDNN's inner product with the weight
packed once (`mkldnn._reorder_linear_weight`, what Inductor's CPU freezing pass uses) took 57 / 63 / 105 ms, the
same greedy tokens. Packing is done lazily per weight tensor (the base's and the tuned side's merged ones) and
kept until `clear()`; calls with more than PACKED_MAX_ROWS rows (prefill, large batches) keep PyTorch's matmul,
which was faster there (40 rows: 190 vs 226 ms).

On a CPU with native bf16 (avx512_bf16: `dtype auto` loads bf16 there) the same holds for bf16 weights: the 7
Linear layers of all 30 decoder layers at two rows took 26.6 ms with `F.linear` and 15.7 ms packed, and the
embedded model's Compare went from 23.2 / 23.6 / 16.7 tokens/s (base / tuned / pair per side) to 28.7 / 29.9 /
19.5, with bit-identical outputs (the same oneDNN bf16 kernels, weights laid out once).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from phi3_lora.speed import forward_swap

PACK_LIMIT_BYTES = 2 * 1024**3  # packed copies kept at most (the embedded model's base + merged: ~1 GB); larger
# models (half of this in Linear weights) keep PyTorch's matmul altogether
PACKED_MAX_ROWS = 16
PACK_FOR_SPEED = True


def packable_dtypes() -> tuple[Any, ...]:
    """float32, and bf16 on a CPU with native bf16 (where `dtype auto` picks it, models.cpu_has_native_bf16) when
    oneDNN has its bf16 kernels; elsewhere bf16 is emulated and a bf16 model keeps PyTorch's matmul."""
    import torch

    from phi3_lora import models

    native = models.cpu_has_native_bf16() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return (torch.float32, torch.bfloat16) if native else (torch.float32,)


def available(model: Any) -> bool:
    """oneDNN is there and the model runs on the CPU in a `packable_dtypes` dtype."""
    import torch

    if not (PACK_FOR_SPEED and torch.backends.mkldnn.is_available()):
        return False
    weight = next(model.parameters(), None)
    return weight is not None and weight.device.type == "cpu" and weight.dtype in packable_dtypes()


class PackedLinears:
    """Packed copies of the weights of a model's Linear layers (LoRA's own small A and B excluded)."""

    def __init__(self) -> None:
        self._packed: dict[int, tuple[Any, Any]] = {}  # id(weight) -> (weight, packed); the weight kept alive
        self._bytes = 0

    def clear(self) -> None:
        self._packed, self._bytes = {}, 0

    def _pack(self, weight: Any) -> Any:
        import torch

        hit = self._packed.get(id(weight))
        if hit is not None and hit[0] is weight:
            return hit[1]
        size = weight.numel() * weight.element_size()
        if self._bytes + size > PACK_LIMIT_BYTES:
            return None
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 2)
        self._packed[id(weight)] = (weight, packed)
        self._bytes += size
        return packed

    def _forward(self, module: Any, x: Any) -> Any:
        import torch

        rows = x.numel() // x.shape[-1]
        packed = self._pack(module.weight) if rows <= PACKED_MAX_ROWS else None
        if packed is None:
            return torch.nn.functional.linear(x, module.weight, module.bias)
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), packed, module.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @contextlib.contextmanager
    def applied(self, model: Any) -> Iterator[None]:
        """`model`'s Linear layers run from packed weights for this call only (where `available`)."""
        import torch

        if not available(model):
            yield
            return
        dtypes = packable_dtypes()
        layers = [m for name, m in model.named_modules()
                  if type(m) is torch.nn.Linear and "lora_" not in name and m.weight.dtype in dtypes]
        if sum(layer.weight.nbytes for layer in layers) > PACK_LIMIT_BYTES // 2:  # room for the base and merged copies
            yield
            return
        with forward_swap.swapped(layers, self._forward):
            yield
