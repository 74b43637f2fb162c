"""The tuned side with the adapter folded into the weights (W + scale * B @ A), for calls without mixed rows.

At batch 1 peft's unmerged LoRA layers add Python work to every token, which made the tuned side ~1.2-1.7x
slower than the base side. `MergedWeights` makes the merged tensors once per adapter (a copy of the adapted
weights, at most MERGE_LIMIT_BYTES) and swaps them in for a call only, adapter layers off; the base's own
tensors go back afterwards, error or not. peft's merge_adapter()/unmerge_adapter() was not used: unmerging
subtracts the delta again, which changed 819,503 base weights by up to 1.2e-7 here, so the base would drift with
every tuned answer. The copy is dropped whenever the adapter changes (`ChatEngine.set_adapter`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from phi3_lora.speed import forward_swap

TUNED = "tuned"  # the engine's adapter name
MERGE_LIMIT_BYTES = 2 * 1024**3  # the largest merged copy of the adapted weights the engine keeps
MERGE_FOR_SPEED = True  # tuned calls of up to MERGE_MAX_ROWS rows run merged; False: peft's unmerged forward
# Merging pays at one row, where peft's per-token Python work dominates; at 20 rows the merged and unmerged tuned
# batch took the same time (58.2 vs 57.7 s, 64 tokens) while the copy costs memory.
MERGE_MAX_ROWS = 1


def mergeable_layers(model: Any) -> list[Any]:
    """The adapter's LoRA layers when the tuned side can run merged (`plain_lora_layers`, the copy within
    MERGE_LIMIT_BYTES), else []."""
    layers = plain_lora_layers(model)
    size = sum(layer.get_base_layer().weight.nbytes for layer in layers)
    return layers if size <= MERGE_LIMIT_BYTES else []


def plain_lora_layers(model: Any) -> list[Any]:
    """The adapter's LoRA layers when all are plain LoRA on float Linear layers (no DoRA or other variant, no LoRA
    bias, no modules_to_save), else []."""
    import torch
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    cfg = getattr(model, "peft_config", {}).get(TUNED)
    if cfg is None or getattr(cfg, "use_dora", False) or getattr(cfg, "lora_bias", False) \
            or getattr(cfg, "modules_to_save", None):
        return []
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and TUNED in m.lora_A]
    for layer in layers:
        weight = getattr(layer.get_base_layer(), "weight", None)
        if type(layer) is not LoraLinear or TUNED in layer.lora_variant or not isinstance(weight, torch.Tensor) \
                or type(weight) not in (torch.Tensor, torch.nn.Parameter) or not weight.is_floating_point():
            return []  # a quantized, embedding or variant layer: peft's own forward
    return layers


def merged_weight(layer: Any, weight: Any) -> Any:
    """W + scale * B @ A as a new tensor: one addmm where the shapes and dtypes allow it, else peft's own delta."""
    import torch

    a, b = layer.lora_A[TUNED].weight, layer.lora_B[TUNED].weight
    if not layer.fan_in_fan_out and a.dtype == b.dtype == weight.dtype and a.device == weight.device:
        return torch.addmm(weight, b, a, alpha=layer.scaling[TUNED])
    return weight + layer.get_delta_weight(TUNED).to(weight.dtype)


class MergedWeights:
    """The merged tensors of the current adapter, made on first use and kept until `clear()`."""

    def __init__(self) -> None:
        self._pairs: list[tuple[Any, Any]] | None = None  # (base layer, merged weight Parameter)

    def clear(self) -> None:
        self._pairs = None

    @property
    def ready(self) -> bool:
        return bool(self._pairs)

    def _build(self, model: Any) -> list[tuple[Any, Any]]:
        import torch

        pairs = []
        with torch.no_grad():
            for layer in mergeable_layers(model):
                base = layer.get_base_layer()
                pairs.append((base, torch.nn.Parameter(merged_weight(layer, base.weight), requires_grad=False)))
        return pairs

    @contextlib.contextmanager
    def applied(self, model: Any) -> Iterator[bool]:
        """`model` answering as base + adapter from the merged weights, adapter layers off (yields True), or
        peft's unmerged forward where merging is not possible (False)."""
        if self._pairs is None:
            self._pairs = self._build(model)
        if not self._pairs:
            yield False
            return
        kept: list[tuple[Any, Any]] = []
        try:
            for base, merged in self._pairs:
                kept.append((base, base.weight))
                base.weight = merged
            with model.disable_adapter():  # LoRA layers call only their base layer, which now holds W + BA
                yield True
        finally:
            for base, weight in kept:
                base.weight = weight


class RowRouting:
    """Base rows first, tuned rows after them, in one batch: each LoRA layer adds its update to the tuned rows'
    slice only. The same sums as peft's mixed-batch routing (adapter_names), without the per-call hook set-up
    and per-layer row lists that cost more than the forward itself at two rows on a CPU. Plain LoRA Linear
    layers only (`plain_lora_layers`); `first_tuned` is the first tuned row, moved as rows leave the batch."""

    def __init__(self, layers: list[Any]) -> None:
        self.layers, self.first_tuned = layers, 0

    def _forward(self, layer: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        result = layer.base_layer(x, *args, **kwargs)
        first = self.first_tuned
        if first >= x.shape[0]:
            return result
        a, b, drop = layer.lora_A[TUNED].weight, layer.lora_B[TUNED].weight, layer.lora_dropout[TUNED]
        rows = x[first:].to(a.dtype)
        if drop.training:
            rows = drop(rows)
        if not result.is_contiguous() or a.dtype != b.dtype:
            update = layer.lora_B[TUNED](layer.lora_A[TUNED](rows)) * layer.scaling[TUNED]
            result[first:] += update.to(result.dtype)
            return result
        # Decoding on a CPU: every module call and elementwise op of peft's form costs more than the math at 1-2 rows
        tuned = result[first:].view(-1, result.shape[-1])
        flat = rows.reshape(-1, rows.shape[-1])
        if result.dtype == a.dtype:  # one product into the tuned rows' slice, scaled by the GEMM itself
            tuned.addmm_(flat @ a.t(), b.t(), alpha=layer.scaling[TUNED])
        else:  # float32 adapter on a bf16 model: the update in the adapter's dtype, rounded once when added (peft's)
            tuned.add_((flat @ a.t()).mm(b.t()).mul_(layer.scaling[TUNED]).to(result.dtype))
        return result

    @contextlib.contextmanager
    def applied(self) -> Iterator["RowRouting"]:
        with forward_swap.swapped(self.layers, self._forward):
            yield self
