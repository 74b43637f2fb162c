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

Sibling layers that read the same input (q/k/v, gate/up: the slices of `families.all_fused`) run as ONE packed
product of their concatenated weights, each layer then reading its columns of that output: on a 2-core Xeon with
AMX at two rows a product of a small matrix is mostly fixed cost (192x576: 59 us, 576x576: 80 us, the three
together as 960x576: 136 us; gate+up 346 -> 255 us). Each output column is the same dot product over the same
inputs in the same kernel, so the fused output equals the separate ones bit for bit (checked at 1-16 rows, bf16
and float32; tests/test_evaluate.py compares the logits).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

from phi3_lora import families
from phi3_lora.speed import forward_swap

PACK_LIMIT_BYTES = 2 * 1024**3  # packed copies kept at most (the embedded model's base + merged: ~1 GB); larger
# models (half of this in Linear weights) keep PyTorch's matmul altogether
PACKED_MAX_ROWS = 16
PACK_FOR_SPEED = True
FUSE_SIBLINGS = True  # q/k/v and gate/up as one packed product each (bit-identical; off: one product per layer)


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


@dataclass
class SharedProduct:
    """One product of an input that sibling layers (q/k/v, gate/up) share: made by the first sibling called with an
    input, each sibling then taking its columns; a sibling called again, or with another input, starts a new one.
    Used by the packed Linear layers here and by Compare's row routing (`merging.RowRouting`, lora_A stacked)."""

    size: int  # how many siblings take columns
    key: tuple[Any, ...] = ()  # what `out` was made from: the input (kept alive, so that `is` cannot match a new
    # tensor at a reused address) and anything else it depends on
    out: Any = None
    taken: int = 0  # bit i: sibling i took its columns of `out`

    def columns(self, x: Any, extra: tuple[Any, ...], bit: int, start: int, stop: int, make: Any) -> Any:
        """Sibling `bit`'s columns [start, stop) of the product of `x` (and `extra`), made by `make()` if needed."""
        if self.out is None or self.key[0] is not x or self.key[1:] != extra or self.taken & bit:
            self.out, self.key, self.taken = make(), (x, *extra), 0
        out = self.out
        self.taken |= bit
        if self.taken == (1 << self.size) - 1:
            self.reset()
        return out[..., start:stop]

    def reset(self) -> None:
        self.out, self.key, self.taken = None, (), 0


@dataclass
class _Siblings:
    """Linear layers of one parent that read the same input (q/k/v, gate/up), in output-column order, and their
    fused product."""

    layers: tuple[Any, ...]
    starts: tuple[int, ...]  # first output column of each layer in the fused output
    product: SharedProduct
    packed: Any = None  # the stacked weights, packed on first use
    bias: Any = None


@dataclass
class _Plan:
    """One Linear layer while applied: the weight it had then, its packed copy and its sibling group, looked up
    once (each nn.Module attribute read costs a __getattr__ call per token)."""

    weight: Any
    bias: Any
    packed: Any = None
    group: _Siblings | None = None
    bit: int = 0
    start: int = 0
    stop: int = 0


def sibling_groups(model: Any, layers: list[Any]) -> list[_Siblings]:
    """Groups of `layers` that are a parent's q/k/v or gate/up projections (`families.sibling_layers`; under a
    LoRA layer its base layer) with the same input width, dtype and bias presence: one fused product each."""
    chosen = {id(layer) for layer in layers}
    groups = []
    for siblings in families.sibling_layers(model):
        members = [m.get_base_layer() if hasattr(m, "get_base_layer") else m for m in siblings]
        if any(id(m) not in chosen for m in members):
            continue
        first = members[0]
        if any(m.weight.shape[1] != first.weight.shape[1] or m.weight.dtype != first.weight.dtype
               or (m.bias is None) != (first.bias is None) for m in members):
            continue
        starts = [0]
        for m in members[:-1]:
            starts.append(starts[-1] + m.weight.shape[0])
        groups.append(_Siblings(tuple(members), tuple(starts), SharedProduct(len(members))))
    return groups


class PackedLinears:
    """Packed copies of the weights of a model's Linear layers (LoRA's own small A and B excluded), sibling layers
    that read the same input packed as one matrix."""

    def __init__(self) -> None:
        self._packed: dict[Any, tuple[Any, Any]] = {}  # weight ids -> (weights, packed); the weights kept alive
        self._bytes = 0
        self._plans: dict[int, _Plan] = {}  # id(layer) -> its plan, while applied

    def clear(self) -> None:
        self._packed, self._bytes = {}, 0

    def _pack(self, *weights: Any) -> Any:
        """The packed form of `weights` stacked by output rows (one weight: itself), or None past the limit."""
        import torch

        key = tuple(id(w) for w in weights)
        hit = self._packed.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], weights)):
            return hit[1]
        size = sum(w.numel() * w.element_size() for w in weights)
        if self._bytes + size > PACK_LIMIT_BYTES:
            return None
        whole = weights[0].detach() if len(weights) == 1 else torch.cat([w.detach() for w in weights])
        packed = torch.ops.mkldnn._reorder_linear_weight(whole, 2)
        self._packed[key] = (weights, packed)
        self._bytes += size
        return packed

    @staticmethod
    def _product(x: Any, packed: Any, bias: Any) -> Any:
        import torch

        rows = x.numel() // x.shape[-1]
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), packed, bias, "none", [], "")
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _sibling_output(self, plan: _Plan, group: _Siblings, x: Any) -> Any:
        """This layer's columns of its group's fused product on `x`: computed by the first sibling called with `x`,
        taken by the others (a sibling called again, or with another input, starts a new product)."""
        import torch

        if group.packed is None:
            group.packed = self._pack(*(m.weight for m in group.layers))
            if group.packed is None:
                return None
            group.bias = None if plan.bias is None else torch.cat([m.bias for m in group.layers])
        return group.product.columns(x, (), plan.bit, plan.start, plan.stop,
                                     lambda: self._product(x, group.packed, group.bias))

    def _forward(self, module: Any, x: Any) -> Any:
        import torch

        plan = self._plans[id(module)]
        if x.numel() // x.shape[-1] <= PACKED_MAX_ROWS and module._parameters["weight"] is plan.weight:
            out = self._sibling_output(plan, plan.group, x) if plan.group is not None else None
            if out is not None:
                return out
            if plan.packed is None:
                plan.packed = self._pack(plan.weight)
            if plan.packed is not None:
                return self._product(x, plan.packed, plan.bias)
        return torch.nn.functional.linear(x, module.weight, module.bias)

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
        self._plans = {id(m): _Plan(m.weight, m.bias) for m in layers}
        for group in sibling_groups(model, layers) if FUSE_SIBLINGS else []:
            for i, (m, start) in enumerate(zip(group.layers, group.starts)):
                plan = self._plans[id(m)]
                plan.group, plan.bit, plan.start, plan.stop = group, 1 << i, start, start + m.weight.shape[0]
        try:
            with forward_swap.swapped(layers, self._forward):
                yield
        finally:
            self._plans = {}
