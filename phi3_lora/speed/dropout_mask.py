"""LoRA dropout's keep mask drawn four values per random-number call, for compiled decoder layers on CUDA.

Under torch.compile, `nn.Dropout` becomes Inductor's `rand(...) > p`, fused into the kernel that makes the layer
input (RMSNorm's, SwiGLU's, the attention output's): every element runs its own Philox-4x32-10 call (ten rounds
of 32-bit multiplies) and keeps one of its four outputs. LoRA dropout draws one value for every input value of
every adapted layer: for Phi-3-mini, 17,408 per token and layer, 4.6 billion in a step of 8,192 tokens, so the
fused kernels become compute-bound on integer work (issue 19's profiles: the kernels that carry dropout took ~41
of a ~290 ms whole-GPU step; the same kernels without it move far less).

Here one Triton kernel draws the mask with `tl.randint4x`: each Philox call gives four independent 32-bit values,
for four elements (a quarter of the calls), and an element is kept when its value is at least round(p * 2**32):
Bernoulli(1 - p) to within 2**-32, where Inductor's float compare is exact to about 2**-24. The compiler then
fuses `x * mask * 1/(1-p)` into the same kernels as before and keeps or remakes the mask for the backward pass
from the op's inputs (the op is deterministic given them: each LoRA layer's own key, and one seed its model
redraws before each forward, buffers the graph reads, so no random op is in it). So the function is nn.Dropout's:
same scale, same dtype, an independent mask per call, the backward's mask the forward's (tests/test_dropout_mask.py;
on the GPU `python -m bench.dropout_check`).

On CUDA with Triton by default (`options.DROPOUT_MASK_KERNEL`; measured on an H200: +4% at the 8 and 24 GiB
plans, +2-3% on the whole GPU, and less memory, docs/benchmarks.md). The op also has a CPU kernel
(torch's generator, seeded from the op's seed) so the compiled path is tested on machines without a GPU;
`options.DROPOUT_MASK_ON_CPU` lets a CPU run take it (tests only: on a CPU the fused draw is not the cost).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from phi3_lora import options

_OP = "phi3_lora::dropout_keep_mask"
_STEP, _KEY = "_phi3_dropout_seed", "_phi3_dropout_key"  # non-persistent buffers of each LoRA layer
_BLOCK = 1024


def threshold(p: float) -> int:
    """The 32-bit value below which an element is dropped: P(drop) = threshold / 2**32, within 2**-32 of p."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return min(int(round(p * 2.0**32)), 2**32 - 1)


@functools.lru_cache(maxsize=1)
def _triton_kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def keep_mask_kernel(seed_ptr, key_ptr, out_ptr, numel, quarter, drop_below, BLOCK: tl.constexpr):  # noqa: ANN001
        # Group g of four elements gets one Philox call: its four outputs go to elements g, g + quarter,
        # g + 2 quarter and g + 3 quarter, so each store is contiguous. Which value serves which element does
        # not matter: every output of every call is an independent uniform 32-bit value.
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        seed = tl.load(seed_ptr) ^ tl.load(key_ptr)
        r0, r1, r2, r3 = tl.randint4x(seed, offs)
        inside = offs < quarter
        tl.store(out_ptr + offs, r0 >= drop_below, mask=inside & (offs < numel))
        tl.store(out_ptr + quarter + offs, r1 >= drop_below, mask=inside & (quarter + offs < numel))
        tl.store(out_ptr + 2 * quarter + offs, r2 >= drop_below, mask=inside & (2 * quarter + offs < numel))
        tl.store(out_ptr + 3 * quarter + offs, r3 >= drop_below, mask=inside & (3 * quarter + offs < numel))

    return keep_mask_kernel


@torch.library.custom_op(_OP, mutates_args=())
def keep_mask(seed: torch.Tensor, key: torch.Tensor, shape: list[int], p: float) -> torch.Tensor:
    """A bool mask of `shape`, True where kept (probability 1 - p), drawn from the 64-bit `seed` xor `key`
    (1-element int64 tensors on the mask's device): the same seed and key give the same mask."""
    out = torch.empty(shape, dtype=torch.bool, device=seed.device)
    numel = out.numel()
    if numel == 0:
        return out
    if seed.device.type == "cuda":
        quarter = (numel + 3) // 4
        grid = ((quarter + _BLOCK - 1) // _BLOCK,)
        with torch.cuda.device(seed.device):
            _triton_kernel()[grid](seed, key, out, numel, quarter, threshold(p), BLOCK=_BLOCK)
        return out
    generator = torch.Generator(device=seed.device.type)
    generator.manual_seed(int((seed.reshape(-1)[0] ^ key.reshape(-1)[0]).item()) & (2**63 - 1))
    values = torch.randint(0, 2**32, shape, generator=generator, dtype=torch.int64, device=seed.device)
    return torch.ge(values, threshold(p), out=out)


@keep_mask.register_fake
def _keep_mask_fake(seed: torch.Tensor, key: torch.Tensor, shape: list[int], p: float) -> torch.Tensor:
    return seed.new_empty(shape, dtype=torch.bool)


def new_seed(device: torch.device) -> torch.Tensor:
    """A fresh seed from torch's generator for `device` (inside a compiled graph, Inductor's own draw)."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def applies(x: torch.Tensor, p: float) -> bool:
    """Whether dropout of `x` with probability `p` draws its mask here (compiled layers; see the module doc)."""
    return 0.0 < p < 1.0 and x.is_floating_point() and taken_on(x.device)


def taken_on(device: torch.device) -> bool:
    """Whether the op draws dropout masks on `device`: asked for, and a kernel for it (Triton on CUDA; the CPU
    kernel only where `options.DROPOUT_MASK_ON_CPU` says so)."""
    if not options.DROPOUT_MASK_KERNEL:
        return False
    if device.type == "cuda":
        return triton_ok()
    return device.type == "cpu" and options.DROPOUT_MASK_ON_CPU


@functools.lru_cache(maxsize=1)
def triton_ok() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language as tl
    except ImportError:
        return False
    return hasattr(tl, "randint4x")


def dropout(x: torch.Tensor, p: float, module: nn.Module | None = None) -> torch.Tensor:
    """nn.Dropout's training forward, `x * mask / (1 - p)` in x's dtype, with the mask from `keep_mask`: keyed by
    `module`'s key and its model's seed of this forward where `install` gave it them (no random op in the graph),
    else by a seed drawn here (a random op, which `seeded_recompute` keeps for the backward pass)."""
    seed, key = (getattr(module, _STEP, None), getattr(module, _KEY, None)) if module is not None else (None, None)
    if seed is None or key is None or seed.device != x.device:
        seed, key = new_seed(x.device), torch.zeros(1, dtype=torch.int64, device=x.device)
    return x * keep_mask(seed, key, list(x.shape), p) * (1.0 / (1.0 - p))


def install(model: nn.Module, modules: list[nn.Module]) -> int:
    """Give each of `modules` (LoRA layers whose dropout this op draws) its own random key, and all of them one
    seed that `model` redraws at the start of each forward pass: each layer's mask is then a pure function of
    tensors the compiled graph reads, so wherever the mask is remade in the backward pass (the partitioner under
    an activation budget, activation checkpointing) it is the forward's mask, and the compiler is free to remake
    it instead of keeping it. Call once the model is on its device (the seed is one tensor, shared)."""
    if not modules:
        return 0
    device = next(iter(modules[0].parameters())).device
    if not taken_on(device):
        return 0  # the op is not taken: no hook drawing from torch's generators
    step = torch.zeros(1, dtype=torch.int64, device=device)
    keys = torch.Generator().manual_seed(torch.initial_seed())  # distinct keys, the global stream untouched
    for module in modules:
        module.register_buffer(_STEP, step, persistent=False)
        module.register_buffer(_KEY, torch.randint(0, 2**62, (1,), generator=keys, dtype=torch.int64).to(device),
                               persistent=False)

    def redraw(_module: nn.Module, _args: Any) -> None:
        step.copy_(new_seed(step.device))

    model.register_forward_pre_hook(redraw)
    return len(modules)
