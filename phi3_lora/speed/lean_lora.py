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

With LoRA dropout in training, `dropout(x) @ A.T` is one autograd function, `DropoutLoraA`, that keeps
for the backward pass only `x` and the random-number state, not the dropped-out copy of `x` and its
mask as `nn.Dropout` + `nn.Linear` do: the backward regenerates the same mask from the same state
(exactly what activation checkpointing does for dropout). `x` is often kept anyway (o_proj's input is
the attention output, which flash attention keeps), so each adapted layer stores 1 to 3 bytes less per
input value: about a fifth of a Phi-3 decoder layer's activations, which lets a memory budget keep
more layers un-checkpointed (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from phi3_lora.speed import dropout_mask, forward_swap, versions

_ORIGINAL = "_peft_forward"
_SAVE_DROPOUT_MEMORY = "_phi3_save_dropout_memory"


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


def _generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None
                                             else torch.cuda.current_device()]
    return torch.default_generator


Remake = tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]


def _liger_swiglu(node: Any) -> Remake | None:
    """Liger's SiLU-mul keeps its inputs (gate, up) for its own backward: its output is one kernel away."""
    if (getattr(node, "dtensor_metadata", None) is not None or getattr(node, "down_multiplier", 1.0) != 1.0
            or not versions.tested("liger_remake")):
        return None
    from liger_kernel.ops.swiglu import swiglu_forward

    gate_multiplier = node.gate_multiplier
    return (lambda a, b: swiglu_forward(a, b, gate_multiplier)[2]), tuple(node.saved_tensors)


# Autograd functions whose backward keeps what it takes to remake their output, by "module.qualname":
# the LoRA product on such an output keeps those tensors (kept anyway) instead of a copy of the output.
REMAKERS: dict[str, Callable[[Any], Remake | None]] = {
    "liger_kernel.ops.swiglu.LigerSiLUMulFunction": _liger_swiglu,
}


def remake_source(x: torch.Tensor) -> Remake | None:
    """How to remake `x` in the backward pass from tensors its producer keeps anyway, or None.

    Never inside saved-tensor hooks (activation checkpointing, offloading): there the producer's saved
    tensors are placeholders, and a checkpointed layer keeps nothing to save memory on anyway.
    """
    if _compiling():  # a compiled layer: the compiler decides what to keep
        return None
    node = x.grad_fn
    cls = getattr(type(node), "_forward_cls", None) if node is not None else None
    if cls is None or _saved_tensor_hooks_active():
        return None
    maker = REMAKERS.get(f"{cls.__module__}.{cls.__qualname__}")
    return maker(node) if maker is not None else None


def _saved_tensor_hooks_active() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


class DropoutLoraA(torch.autograd.Function):
    """`native_dropout(x, p) @ weight.T`, keeping for the backward pass `x` (or what remakes it) and the RNG
    state, instead of the dropped-out `x` and the mask that `nn.Dropout` + `nn.Linear` keep.

    `x` and `weight` come in the compute dtype (the caller casts, as autocast would); the mask is drawn
    by `torch.native_dropout`, which is what `nn.Dropout` runs on CUDA and draws the same mask on CPU.
    With `remake` (see `remake_source`), `x` itself is not kept either: the backward remakes it.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, p: float, remake: Remake | None) -> torch.Tensor:
        ctx.p, ctx.shape = p, x.shape
        if p > 0:
            ctx.rng_state = _generator(x.device).get_state()
            dropped, _ = torch.native_dropout(x, p, True)
        else:
            dropped = x
        ctx.remake = remake[0] if remake is not None else None
        ctx.save_for_backward(weight, *(remake[1] if remake is not None else (x,)))
        return dropped @ weight.t()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        weight, *kept = ctx.saved_tensors
        x = ctx.remake(*kept).view(ctx.shape) if ctx.remake is not None else kept[0]
        mask = None
        if ctx.p > 0:
            gen = _generator(x.device)
            now = gen.get_state()
            gen.set_state(ctx.rng_state)
            try:
                dropped, mask = torch.native_dropout(x, ctx.p, True)
            finally:
                gen.set_state(now)
        else:
            dropped = x
        flat = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (flat @ weight).view(ctx.shape)
            if mask is not None:
                grad_x = torch.ops.aten.native_dropout_backward(grad_x, mask, 1.0 / (1.0 - ctx.p))
        if ctx.needs_input_grad[1]:
            grad_w = flat.t() @ dropped.reshape(-1, ctx.shape[-1])
        return grad_x, grad_w, None, None


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def _lora_a(self: Any, name: str, x: torch.Tensor) -> torch.Tensor:
    """lora_A(dropout(x)), through `DropoutLoraA` for a plain, unhooked nn.Linear on CUDA or CPU.

    Plain `lora_A(dropout(x))` instead where `DropoutLoraA`'s memory saving is switched off for this layer
    (`install(..., save_dropout_memory=False)`: a memory budget with room to spare, where the kept mask costs
    less time than regenerating it) and inside torch.compile, which cannot trace the RNG state's save and
    restore (each would break the graph) and keeps or regenerates dropout's mask its own way (there, where
    `dropout_mask.applies`, the mask is drawn by its kernel, four values per random-number call)."""
    a, drop = self.lora_A[name], self.lora_dropout[name]
    p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
    plain = type(a) is nn.Linear and a.bias is None and not _hooked(a) and not _hooked(drop)
    # the RNG state saved and restored is the CUDA or CPU generator's: other devices keep nn.Dropout
    if _compiling() and p > 0 and not _hooked(drop) and dropout_mask.applies(x, p):
        return a(dropout_mask.dropout(x, p, self))
    if not (plain and 0.0 <= p < 1.0 and x.device.type in ("cuda", "cpu")) or _compiling() or (
            p > 0 and not getattr(self, _SAVE_DROPOUT_MEMORY, True)):
        return a(drop(x))
    x = x.to(torch.get_autocast_dtype(x.device.type))
    return DropoutLoraA.apply(x, a.weight.to(x.dtype), p, remake_source(x))


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


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
    h = _lora_a(self, name, x)
    flat = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]),
                       self.lora_B[name].weight.t(), alpha=self.scaling[name])
    return flat.view(result.shape)


def install(model: nn.Module, save_dropout_memory: bool = True) -> int:
    """Give every peft LoRA Linear in `model` the lean forward (idempotent); returns how many layers changed.

    `save_dropout_memory`: LoRA dropout through `DropoutLoraA` (keeps `x` and the RNG state, regenerates the
    mask in backward) or, False, as nn.Dropout + nn.Linear (keeps the dropped-out copy and the mask: more
    memory, one dropout kernel less per adapted layer and step). Set on every layer, installed or not.
    None with library versions it was not tested with (phi3_lora.speed.versions): peft's own forward stays."""
    if not versions.tested("lean_lora"):
        return 0
    classes = lora_linear_classes()
    count = 0
    for module in model.modules():
        if isinstance(module, classes):
            setattr(module, _SAVE_DROPOUT_MEMORY, save_dropout_memory)
        if isinstance(module, classes) and forward_swap.replace(module, lean_forward, _ORIGINAL):
            count += 1
    return count


def uninstall(model: nn.Module) -> int:
    """Put peft's own forward back on every layer `install` changed; returns how many."""
    count = 0
    for module in model.modules():
        if forward_swap.restore(module, _ORIGINAL):
            if hasattr(module, _SAVE_DROPOUT_MEMORY):
                delattr(module, _SAVE_DROPOUT_MEMORY)
            count += 1
    return count
