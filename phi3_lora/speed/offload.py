"""Activations in host memory instead of GPU memory, copied on a side stream while the GPU computes.

Two ways a decoder layer can keep less on the GPU under a memory budget, both exact (same gradients):

- **Checkpointed layer, input offloaded** (`offloaded_checkpoint`): gradient checkpointing keeps only a
  layer's input and recomputes the rest in the backward pass; here even that input (b*s*hidden values,
  48 MiB per Phi-3-mini layer at 4 x 2048 tokens) goes to pinned host memory, and comes back one layer
  ahead of its recompute. This is what Unsloth's gradient checkpointing does.
- **Un-checkpointed layer, activations offloaded** (`LayerOffload.wrap`): the layer runs normally, but every
  tensor autograd keeps for its backward pass (0.56 GiB per Phi-3-mini layer) is copied to host memory as
  it is saved, freed on the GPU once copied, and copied back ahead of the layer's backward pass. No
  recompute; the cost is host-link bandwidth, so only a share of the layers (spaced out, so each copy
  overlaps the next layers' compute) are offloaded: see options.offload_plan.

On a CPU "host memory" is the same memory: the copies still happen (so tests exercise every path), which
costs time and saves nothing; `options.resolve_options` never turns offloading on without CUDA.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

MIN_BYTES = 1 << 16  # smaller saved tensors (norm weights' stats, LoRA factors' inputs of rank r) stay put


class HostCopies:
    """Copies tensors device -> pinned host on a side stream, and back; keeps the stream order right.

    `store` returns a handle at once (the copy runs behind the compute stream; the GPU block is kept from
    reuse until it finished, via `record_stream`); `load` returns the tensor on the device, waiting for a
    prefetch started by `prefetch` if there was one.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.stored = 0  # storages copied out so far, and their bytes (for tests and the bench)
        self.stored_bytes = 0

    def to_host(self, t: torch.Tensor) -> "_Held":
        held = _Held(dtype=t.dtype, size=t.size(), stride=t.stride(), offset=t.storage_offset())
        raw = _raw(t)
        self.stored += 1
        self.stored_bytes += raw.numel()
        if not self.cuda:
            held.host = raw.clone()
            return held
        held.host = torch.empty(raw.shape, dtype=torch.uint8, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            held.host.copy_(raw, non_blocking=True)
            held.event = torch.cuda.Event()
            held.event.record(self.stream)
        raw.record_stream(self.stream)
        return held

    def prefetch(self, held: "_Held") -> None:
        if held.device is not None or held.host is None:
            return
        if not self.cuda:
            held.device = held.host.clone()
            return
        buf = torch.empty(held.host.shape, dtype=torch.uint8, device=self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            buf.copy_(held.host, non_blocking=True)
            held.event = torch.cuda.Event()
            held.event.record(self.stream)
        buf.record_stream(self.stream)
        held.device = buf

    def load(self, held: "_Held") -> torch.Tensor:
        self.prefetch(held)
        if self.cuda and held.event is not None:
            torch.cuda.current_stream(self.device).wait_event(held.event)
        raw = held.device
        out = torch.empty(0, dtype=held.dtype, device=raw.device)
        out.set_(raw.untyped_storage(), held.offset, held.size, held.stride)
        return out

    def release(self, held: "_Held") -> None:
        held.host = held.device = held.event = held.prev = None


@dataclass
class _Held:
    dtype: torch.dtype
    size: torch.Size
    stride: tuple[int, ...]
    offset: int
    host: torch.Tensor | None = None
    device: torch.Tensor | None = None
    event: Any = None
    prev: "_Held | None" = None  # the input held before this one in the forward pass (prefetched first)


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The whole storage behind `t`, as bytes (views of one storage share one copy)."""
    storage = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage, 0, (storage.nbytes(),), (1,))


# --- a checkpointed layer whose input waits in host memory ---------------------------------------------

class _OffloadedCheckpoint(torch.autograd.Function):
    """Gradient checkpointing of `run(hidden)` keeping `hidden` in host memory (reentrant style: the
    backward recomputes under the forward's RNG and autocast state and back-propagates through it)."""

    @staticmethod
    def forward(ctx: Any, run: Callable[..., Any], copies: HostCopies, order: "_Order", hidden: torch.Tensor,
                *args: Any) -> torch.Tensor:
        ctx.run, ctx.copies, ctx.args, ctx.order = run, copies, args, order
        dev = hidden.device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev),
                        torch.is_autocast_cache_enabled())
        ctx.rng = _rng_state(hidden.device)
        ctx.held = copies.to_host(hidden.detach())
        order.push(ctx.held)
        with torch.no_grad():
            out = run(hidden, *args)
        if not isinstance(out, torch.Tensor):
            raise TypeError("offloaded_checkpoint needs a layer that returns one tensor")
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        if ctx.held.prev is not None and ctx.held.prev.host is not None:
            ctx.copies.prefetch(ctx.held.prev)  # the next checkpointed layer the backward pass reaches
        hidden = ctx.copies.load(ctx.held).detach().requires_grad_(True)
        ctx.copies.release(ctx.held)
        dev, enabled, dtype, cache = ctx.autocast
        now = _rng_state(hidden.device)
        _set_rng_state(hidden.device, ctx.rng)
        try:
            with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled, cache_enabled=cache):
                out = ctx.run(hidden, *ctx.args)
        finally:
            _set_rng_state(hidden.device, now)
        torch.autograd.backward(out, grad)
        return (None, None, None, hidden.grad) + (None,) * len(ctx.args)


class _Order:
    """Links each held input to the one held before it, so a backward can prefetch the one it needs next."""

    def __init__(self) -> None:
        self.last: _Held | None = None

    def push(self, held: _Held) -> None:
        if self.last is not None and self.last.host is not None:
            held.prev = self.last
        self.last = held


def _rng_state(device: torch.device) -> tuple[Any, Any]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple[Any, Any]) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda" and state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def offloaded_checkpoint(copies: HostCopies, order: _Order, run: Callable[..., Any], hidden: torch.Tensor,
                         *args: Any) -> torch.Tensor:
    """A `_gradient_checkpointing_func` for transformers' GradientCheckpointingLayer (`func(forward, *args)`)."""
    return _OffloadedCheckpoint.apply(run, copies, order, hidden, *args)


# --- an un-checkpointed layer whose saved activations wait in host memory ----------------------------

@dataclass
class _LayerSaved:
    held: dict[int, _Held] = field(default_factory=dict)  # by storage address: views share one copy
    fetched: bool = False
    keep: list[torch.Tensor] = field(default_factory=list)  # the GPU storages until the layer's forward ends,
    # so no address is reused (and mistaken for a held storage) while the layer still saves tensors


class LayerOffload:
    """Saved-tensor hooks around chosen decoder layers: what autograd keeps goes to host memory.

    Each wrapped layer's saved tensors (those of at least MIN_BYTES that are not parameters) are copied to
    host memory as they are saved. In the backward pass, the gradient reaching the output of the layer *after*
    a wrapped one starts the copy back of the wrapped layer's tensors, so it overlaps that next layer's
    backward; a layer whose copies are not back yet waits for them.
    """

    def __init__(self, copies: HostCopies, params: set[int]) -> None:  # params: their storage addresses
        self.copies, self.params = copies, params
        self.current: _LayerSaved | None = None
        self.pending_prefetch: _LayerSaved | None = None  # the last wrapped layer, until the next layer's output

    def _pack(self, t: torch.Tensor) -> Any:
        cur = self.current
        if (cur is None or t.device != self.copies.device or not t.is_floating_point()
                or t.untyped_storage().nbytes() < MIN_BYTES or t.untyped_storage().data_ptr() in self.params):
            return t
        key = t.untyped_storage().data_ptr()
        held = cur.held.get(key)
        if held is None:
            held = cur.held[key] = self.copies.to_host(t)
            cur.keep.append(t)
        view = _Held(dtype=t.dtype, size=t.size(), stride=t.stride(), offset=t.storage_offset())
        return (cur, key, view)

    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        saved, key, view = packed
        if not saved.fetched:
            self.fetch(saved)
        held = saved.held[key]
        raw = self.copies.load(held)
        out = torch.empty(0, dtype=view.dtype, device=raw.device)
        out.set_(raw.untyped_storage(), view.offset, view.size, view.stride)
        return out

    def fetch(self, saved: _LayerSaved) -> None:
        saved.fetched = True
        for held in saved.held.values():
            self.copies.prefetch(held)

    def wrap(self, layer: nn.Module, prefetch_from: nn.Module | None) -> list[Any]:
        """Offload `layer`'s saved tensors; `prefetch_from` (the next layer) starts their copy back."""
        hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

        def pre(module: nn.Module, args: Any) -> None:
            if torch.is_grad_enabled() and module.training:
                self.current = _LayerSaved()
                hooks.__enter__()

        def post(module: nn.Module, args: Any, output: Any) -> None:
            if self.current is not None:
                hooks.__exit__(None, None, None)
                self.current.keep.clear()
                self.pending_prefetch, self.current = self.current, None

        handles = [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post, always_call=True)]
        if prefetch_from is not None:
            handles.append(prefetch_from.register_forward_hook(self._arm_prefetch))
        return handles

    def _arm_prefetch(self, module: nn.Module, args: Any, output: Any) -> None:
        saved, self.pending_prefetch = self.pending_prefetch, None
        out = output[0] if isinstance(output, tuple) else output
        if saved is None or not isinstance(out, torch.Tensor) or not out.requires_grad:
            return

        def start(grad: torch.Tensor) -> None:
            if not saved.fetched:
                self.fetch(saved)

        out.register_hook(start)


# --- putting it on a model --------------------------------------------------------------------------

def decoder_layers(model: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def install(model: nn.Module, checkpointed: list[int], offloaded: list[int], offload_inputs: bool = True) -> dict:
    """Checkpoint the layers `checkpointed` (inputs in host memory when `offload_inputs`), offload the
    saved activations of the layers `offloaded`, leave the rest as they are. Call after the trainer enabled
    gradient checkpointing (it sets every layer's flag and checkpoint function). Returns what was done."""
    layers = decoder_layers(model)
    device = next(p.device for p in model.parameters())
    copies = HostCopies(device)
    order = _Order()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    offload = LayerOffload(copies, params)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in checkpointed
        if i in checkpointed and offload_inputs:
            layer._gradient_checkpointing_func = functools.partial(offloaded_checkpoint, copies, order)
        if i in offloaded and i not in checkpointed:
            offload.wrap(layer, layers[i + 1] if i + 1 < len(layers) else None)
    model._phi3_offload_copies = copies  # noqa: SLF001 - so callers can read what was copied
    return {"layers": len(layers), "checkpointed": sorted(checkpointed), "offloaded": sorted(offloaded),
            "inputs_offloaded": bool(offload_inputs)}
