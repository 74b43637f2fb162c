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
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

from phi3_lora.cpu_linear import SharedProduct
from phi3_lora.speed import forward_swap

log = logging.getLogger(__name__)

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


@dataclass
class _Group:
    """LoRA layers that read one input (q/k/v, gate/up): their lora_A stacked, and the tuned rows' product with it
    ([tuned rows, sum of ranks]), shared until each layer has taken its columns."""

    a_t: Any  # [in, sum of the layers' ranks]
    product: SharedProduct
    a_ts: tuple[Any, ...] = ()  # each layer's own lora_A^T, as `_Layer.a_t`
    exact: dict[tuple[int, int], bool] = field(default_factory=dict)  # (rows, threads) -> `stacks_exactly`

    def stacks_exactly(self, rows: int) -> bool:
        """Whether the stacked product gives each layer its columns bit for bit as the layer's own product would, at
        this many rows on this machine. The BLAS picks its kernel by shape: on a 2-core EPYC without AVX-512, 4 rows
        times 8+8+8 stacked float32 columns sum in another order than 4 rows times 8 (the AMX Xeon sums them alike),
        and Compare's answers must stay peft's. Probed once per row and thread count, on random rows (a different
        summation order shows in the last bits of almost every entry)."""
        import torch

        key = (rows, torch.get_num_threads())
        if key not in self.exact:
            with torch.no_grad():
                gen = torch.Generator().manual_seed(rows)
                probe = torch.randn(rows, self.a_t.shape[0], generator=gen).to(self.a_t.dtype)
                whole, col = probe.mm(self.a_t), 0
                same = True
                for a_t in self.a_ts:
                    same = same and torch.equal(whole[:, col:col + a_t.shape[1]], probe.mm(a_t))
                    col += a_t.shape[1]
            if not same:
                log.info("LoRA layers that read one input keep their own products at %d rows here", rows)
            self.exact[key] = same
        return self.exact[key]


@dataclass
class _Layer:
    """What one LoRA layer's routed forward reads, looked up once per call (each nn.Module attribute read costs a
    __getattr__ call per token)."""

    base: Any
    hooked: bool  # the base layer has forward hooks: called as a module, else its forward directly
    a_t: Any  # lora_A^T, a view made once (a .t() per token was two more dispatched ops)
    b_t: Any  # lora_B^T, times the scaling where that is exact (`folded`)
    scaling: float
    fast: bool  # same-dtype A and B, no dropout in training: the product form below; else peft's modules
    folded: bool = False
    group: _Group | None = None
    bit: int = 0
    start: int = 0
    stop: int = 0


@dataclass
class LoraPlan:
    """One layer's tuned-row update as `RowRouting` makes it: h = (x @ a_t)[:, cols]; then where the adapter's dtype is
    the layer's, out.addmm_(h, b_t, alpha=scaling), else out += (h @ b_t [* scaling, unless folded]).to(out.dtype)."""

    a_t: Any
    cols: tuple[int, int] | None
    b_t: Any
    scaling: float
    folded: bool


class RowRouting:
    """Base rows first, tuned rows after them, in one batch: each LoRA layer adds its update to the tuned rows'
    slice only. The same sums as peft's mixed-batch routing (adapter_names), without the per-call hook set-up
    and per-layer row lists that cost more than the forward itself at two rows on a CPU. Plain LoRA Linear
    layers only (`plain_lora_layers`); `first_tuned` is the first tuned row, moved as rows leave the batch.

    `siblings` (`families.sibling_layers`): LoRA layers that read one input (q/k/v, gate/up) cast the tuned rows
    once and multiply them with their stacked lora_A in one product, each layer then taking its columns, wherever
    that sums each column as the layer's own product would (`_Group.stacks_exactly`; tests/test_pair_decoding.py
    compares logits)."""

    def __init__(self, layers: list[Any], siblings: list[tuple[Any, ...]] = ()) -> None:
        self.layers, self.first_tuned = layers, 0
        self._plan: dict[int, _Layer] = {}
        for layer in layers:
            a, b, scaling, base = layer.lora_A[TUNED].weight, layer.lora_B[TUNED].weight, layer.scaling[TUNED], \
                layer.base_layer
            plan = _Layer(base, _hooked(base), a.t(), b.t(), scaling,
                          a.dtype == b.dtype and not layer.lora_dropout[TUNED].training)
            if plan.fast and a.dtype != base.weight.dtype and _power_of_two(scaling):
                # (h @ B^T) * 2^k == h @ (2^k B)^T bit for bit: every product and partial sum is scaled exactly
                # (short of float32's subnormal range, 1e-38), and one op per layer and token less
                plan.b_t, plan.folded = (b.detach() * scaling).t(), True
            self._plan[id(layer)] = plan
        for group in siblings:
            plans = [self._plan.get(id(layer)) for layer in group]
            a = [layer.lora_A[TUNED].weight for layer in group] if all(plans) else []
            if not a or not all(p.fast for p in plans) or len({(w.dtype, w.shape[1]) for w in a}) != 1:
                continue
            shared, col = _Group(_cat_t(a), SharedProduct(len(group)), tuple(p.a_t for p in plans)), 0
            for i, (plan, weight) in enumerate(zip(plans, a)):
                plan.group, plan.bit, plan.start, plan.stop = shared, 1 << i, col, col + weight.shape[0]
                col += weight.shape[0]

    @property
    def stacked_groups(self) -> int:
        return len({id(p.group) for p in self._plan.values() if p.group is not None})

    def plan_of(self, layer: Any, rows: int = 1) -> Any:
        """How `layer`'s tuned rows (`rows` of them, flattened) get their update, for a compiled step that must make
        the same sums (`pair_graph`): (lora_A^T of the layer or of its sibling group, its columns or None, lora_B^T,
        scaling, folded); None for a layer this routing does not touch."""
        plan = self._plan.get(id(layer))
        if plan is None:
            return None
        stacked = plan.group is not None and plan.group.stacks_exactly(rows)
        a_t, cols = (plan.group.a_t, (plan.start, plan.stop)) if stacked else (plan.a_t, None)
        return LoraPlan(a_t, cols, plan.b_t, plan.scaling, plan.folded)

    def plain_fast(self) -> bool:
        """Every layer takes the product form (`_forward`'s fast path), the form `plan_of` describes."""
        return all(p.fast for p in self._plan.values())

    @staticmethod
    def _down(plan: _Layer, x: Any, first: int) -> Any:
        """The tuned rows of `x` times this layer's lora_A^T, [rows, r] (from its group's shared product)."""
        group = plan.group
        if group is None or not group.stacks_exactly((x.shape[0] - first) * (x.numel() // (x.shape[0] * x.shape[-1]))):
            return x[first:].to(plan.a_t.dtype).reshape(-1, x.shape[-1]).mm(plan.a_t)
        return group.product.columns(x, (first,), plan.bit, plan.start, plan.stop,
                                     lambda: x[first:].to(group.a_t.dtype).reshape(-1, x.shape[-1]).mm(group.a_t))

    def _forward(self, layer: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        plan = self._plan[id(layer)]
        # the base layer's forward without Module.__call__ (~8 us a call on the 2-core Xeon) where nothing hooks it
        result = plan.base(x, *args, **kwargs) if plan.hooked else plan.base.forward(x, *args, **kwargs)
        first = self.first_tuned
        if first >= x.shape[0]:
            return result
        tuned = _row_view(result[first:]) if plan.fast else None
        if tuned is None:
            rows = layer.lora_dropout[TUNED](x[first:].to(plan.a_t.dtype))
            update = layer.lora_B[TUNED](layer.lora_A[TUNED](rows)) * plan.scaling
            result[first:] += update.to(result.dtype)
            return result
        # Decoding on a CPU: every module call and elementwise op of peft's form costs more than the math at 1-2 rows
        h = self._down(plan, x, first)
        if result.dtype == plan.b_t.dtype:  # one product into the tuned rows' slice, scaled by the GEMM itself
            tuned.addmm_(h, plan.b_t, alpha=plan.scaling)
        else:  # float32 adapter on a bf16 model: the update in the adapter's dtype, rounded once when added (peft's)
            update = h.mm(plan.b_t)
            tuned.add_((update if plan.folded else update.mul_(plan.scaling)).to(result.dtype))
        return result

    @contextlib.contextmanager
    def applied(self) -> Iterator["RowRouting"]:
        try:
            with forward_swap.swapped(self.layers, self._forward):
                yield self
        finally:
            for plan in self._plan.values():
                if plan.group is not None:
                    plan.group.product.reset()


def _hooked(module: Any) -> bool:
    """Whether calling `module` runs more than its forward (its own or global forward hooks)."""
    from torch.nn.modules import module as nn_module

    return bool(module._forward_hooks or module._forward_pre_hooks or nn_module._global_forward_hooks
                or nn_module._global_forward_pre_hooks)


def _power_of_two(value: float) -> bool:
    return value > 0 and math.frexp(value)[0] == 0.5


def _cat_t(weights: list[Any]) -> Any:
    """lora_A weights stacked by rows, transposed: [in, sum of ranks]."""
    import torch

    return torch.cat([w.detach() for w in weights]).t()


def _row_view(t: Any) -> Any:
    """`t` as a 2-D [rows, columns] view of the same memory (written in place), or None where its strides do not
    allow one. A fused sibling product's columns (`cpu_linear`) are such a view: rows apart by the fused width."""
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None
