"""The memory budget's per-layer plan on a model, compiled decoder layers, and the CUDA allocator setting.

`options.resolve_options` decides; this module does: checkpointing on only the layers the budget needs (through
transformers' per-layer flag), `torch.compile` per decoder layer, and expandable segments in PyTorch's CUDA
allocator (a private torch function).
"""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback

from torch import nn


class PartialCheckpointing(TrainerCallback):
    """Keep gradient checkpointing on only the first `layers` decoder layers (what the memory budget needs).

    Trainer switches checkpointing on for every layer just before `on_train_begin`; transformers checks a
    per-layer flag (`GradientCheckpointingLayer.gradient_checkpointing`), so the rest are switched back off here.
    """

    def __init__(self, layers: int) -> None:
        self.layers = layers

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            return
        from transformers.modeling_layers import GradientCheckpointingLayer

        blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        for i, block in enumerate(blocks):
            block.gradient_checkpointing = i < self.layers


RECOMPILE_LIMIT = 32


def compile_available() -> bool:
    """Whether torch.compile can generate code for this GPU (Triton importable and the GPU supported; e.g. not
    on Windows without Triton) with tested versions: otherwise the plan keeps eager layers, planned as such."""
    from phi3_lora.speed import versions

    if not versions.tested("compile_layers"):
        return False
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    try:
        return bool(has_triton())
    except Exception:  # noqa: BLE001 -- any failure to probe means: do not plan on the compiler
        return False


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers (transformers' checkpointable layer class), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_layers(model: Any, *, activation_budget: float | None = None, **compile_kwargs: Any) -> int:
    """torch.compile on each decoder layer, as one region each (a checkpointed layer recomputes the compiled
    forward); lean_lora's forward traces without a graph break. Returns how many layers.

    Every layer runs the same code, so their graphs count against one recompile limit (8 by default): the first
    layer (its input needs no gradient), checkpointed and un-checkpointed layers and, with packed rows of
    varying length, the dynamic-shape recompiles can reach it, past which dynamo runs the rest eagerly.
    `activation_budget`: the share of a layer's activations it may keep (it recomputes the cheapest ops first)."""
    import torch

    from phi3_lora.speed import dropout_mask, lean_lora, seeded_recompute

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    torch._functorch.config.activation_memory_budget = 1.0 if activation_budget is None else activation_budget
    seeded_recompute.install()  # below 1, the partitioner would otherwise redraw dropout's mask in the backward
    dropout_mask.install(model, [m for m in model.modules() if isinstance(m, lean_lora.lora_linear_classes())])
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(**compile_kwargs)
    return len(layers)


def expandable_segments() -> None:
    """Let PyTorch's CUDA allocator grow segments instead of caching fixed blocks, unless the user configured it:
    less memory is reserved but unused (fragmentation), which the memory budget's margin assumes."""
    import torch

    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"):
        return
    try:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    except (AttributeError, RuntimeError):  # an older torch: the default allocator is still correct
        pass
