"""cuDNN's fused attention over packed sequences of unequal lengths (THD: tokens x heads x dim, each sequence's
start given as a ragged offset), through cuDNN's own Python frontend (`nvidia-cudnn-frontend`). Off
(options.CUDNN_RAGGED): on an H200 with cuDNN 9.19 it gives flash's results to the digit but is 19-39% slower a
layer on the chat mix, 2.7% slower a training step (docs/benchmarks.md, issue 19's eighth session).

Why: on the chat mix both the engine and Unsloth run flash's varlen kernel, which costs per Phi-3 layer what
cuDNN costs on four full rows holding three times the work (docs/benchmarks.md, sixth session); torch 2.11's own
ragged cuDNN call was ~90x slower with wrong gradients. Here the graphs have fixed extents: SLOTS sequences of at
most S_MAX tokens (zero-length sequences fill the unused slots) and the token count rounded up to TOKEN_STEP for
the backward's workspace, so one built pair of plans serves every layer and step; a pack's lengths are data, made
on the GPU from its cu_seqlens (`device_meta`, no host read). Both passes are torch custom ops, so compiled layers
keep them in their graph. The forward keeps cuDNN's softmax statistics for the backward, padded to
SLOTS x heads x S_MAX fp32 (16 MiB a Phi-3 layer), which the memory model does not count yet.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

SLOTS = 64  # sequences in one pack (the bench's chat mix: 18-26 in 4 x 2,048 tokens)
S_MAX = 2048  # tokens in one sequence
TOKEN_STEP = 2048  # the backward's workspace is sized for the pack's tokens rounded up to this


@functools.cache
def frontend() -> Any | None:
    """cuDNN's Python frontend, or None where it is not installed or finds no cuDNN (loaded by torch first)."""
    if not torch.backends.cudnn.is_available():
        return None
    try:
        import cudnn
    except (ImportError, OSError):
        return None
    return cudnn


def usable(q: torch.Tensor, k: torch.Tensor, sequences: int, max_len: int) -> bool:
    """Whether this path takes (T, H, D) `q` / `k` holding `sequences` packed sequences of at most `max_len`."""
    return (q.is_cuda and q.dtype == torch.bfloat16 and k.shape[1] == q.shape[1] and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 128 and sequences <= SLOTS and max_len <= S_MAX and frontend() is not None)


def device_meta(cu: torch.Tensor, heads: int, dim: int, slots: int = SLOTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence lengths (slots, 1, 1, 1), ragged offsets in elements (slots + 1, 1, 1, 1)), int32, from the
    cu_seqlens of a pack, on its device and without reading it on the host: the slots past the pack's sequences
    hold zero-length sequences at its end (pure)."""
    cu = cu.to(torch.int32)
    padded = torch.cat([cu, cu[-1:].expand(slots + 1 - cu.numel())])
    return (padded[1:] - padded[:-1]).view(-1, 1, 1, 1), (padded * (heads * dim)).view(-1, 1, 1, 1)


@functools.cache
def _handle() -> Any:
    return frontend().create_handle()


@functools.cache
def _graphs(slots: int, heads: int, dim: int, tokens: int, scale: float) -> dict[str, Any]:
    """The causal forward and backward graphs and their tensors by name, built once per extents."""
    cudnn = frontend()
    bf16, f32, i32 = cudnn.data_type.BFLOAT16, cudnn.data_type.FLOAT, cudnn.data_type.INT32
    dims, strides = [slots, heads, S_MAX, dim], [S_MAX * heads * dim, dim, heads * dim, 1]
    stats_dims, stats_strides = [slots, heads, S_MAX, 1], [heads * S_MAX, S_MAX, 1, 1]
    out: dict[str, Any] = {}
    for kind in ("fwd", "bwd"):
        g = cudnn.pygraph(io_data_type=bf16, intermediate_data_type=f32, compute_data_type=f32, handle=_handle())
        t: dict[str, Any] = {
            "ragged": g.tensor(name="ragged", dim=[slots + 1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=i32),
            "seq": g.tensor(name="seq", dim=[slots, 1, 1, 1], stride=[1, 1, 1, 1], data_type=i32)}

        def packed(name: str) -> Any:
            x = g.tensor(name=name, dim=dims, stride=strides, data_type=bf16)
            x.set_ragged_offset(t["ragged"])
            return x

        def packed_output(x: Any) -> Any:
            return x.set_output(True).set_dim(dims).set_stride(strides).set_data_type(bf16).set_ragged_offset(
                t["ragged"])

        t.update({n: packed(n) for n in ("q", "k", "v")})
        mask = dict(attn_scale=scale, use_padding_mask=True, seq_len_q=t["seq"], seq_len_kv=t["seq"],
                    diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT, diagonal_band_right_bound=0)
        if kind == "fwd":
            o, stats = g.sdpa(name="sdpa", q=t["q"], k=t["k"], v=t["v"], generate_stats=True, **mask)
            t["o"] = packed_output(o)
            t["stats"] = stats.set_output(True).set_data_type(f32).set_dim(stats_dims).set_stride(stats_strides)
        else:
            t.update({n: packed(n) for n in ("o", "do")})
            t["stats"] = g.tensor(name="stats", dim=stats_dims, stride=stats_strides, data_type=f32)
            grads = g.sdpa_backward(name="sdpa_backward", q=t["q"], k=t["k"], v=t["v"], o=t["o"], dO=t["do"],
                                    stats=t["stats"], max_total_seq_len_q=tokens, max_total_seq_len_kv=tokens,
                                    **mask)
            t.update({n: packed_output(x) for n, x in zip(("dq", "dk", "dv"), grads)})
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        out[kind] = (g, t)
    return out


def _execute(kind: str, slots: int, scale: float, q: torch.Tensor, cu: torch.Tensor,
             buffers: dict[str, torch.Tensor]) -> None:
    heads, dim = q.shape[1], q.shape[2]
    graph, t = _graphs(slots, heads, dim, math.ceil(q.shape[0] / TOKEN_STEP) * TOKEN_STEP, scale)[kind]
    seq, ragged = device_meta(cu, heads, dim, slots)
    workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device=q.device)
    frontend().set_stream(handle=_handle(), stream=torch.cuda.current_stream(q.device).cuda_stream)
    graph.execute({t[n]: b for n, b in {**buffers, "seq": seq, "ragged": ragged}.items()}, workspace,
                  handle=_handle())


@torch.library.custom_op("phi3_lora::cudnn_ragged_attention", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float,
             slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    o = torch.empty_like(q)
    stats = q.new_empty((slots, q.shape[1], S_MAX, 1), dtype=torch.float32)
    _execute("fwd", slots, scale, q, cu, {"q": q, "k": k, "v": v, "o": o, "stats": stats})
    return o, stats


@_forward.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float,
      slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), q.new_empty((slots, q.shape[1], S_MAX, 1), dtype=torch.float32)


@torch.library.custom_op("phi3_lora::cudnn_ragged_attention_backward", mutates_args=())
def _backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 stats: torch.Tensor, cu: torch.Tensor, scale: float,
                 slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
    _execute("bwd", slots, scale, q, cu, {"q": q, "k": k, "v": v, "o": o, "do": grad, "stats": stats, "dq": dq,
                                          "dk": dk, "dv": dv})
    return dq, dk, dv


@_backward_op.register_fake
def _(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, stats: torch.Tensor,
      cu: torch.Tensor, scale: float, slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, cu, scale, slots = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu)
    ctx.scale, ctx.slots = scale, slots


def _backward(ctx: Any, grad: torch.Tensor, _stats_grad: Any) -> tuple[Any, ...]:
    q, k, v, o, stats, cu = ctx.saved_tensors
    dq, dk, dv = _backward_op(grad.contiguous(), q, k, v, o, stats, cu, ctx.scale, ctx.slots)
    return dq, dk, dv, None, None, None


_forward.register_autograd(_backward, setup_context=_setup_context)


def ragged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float | None,
                     slots: int = SLOTS) -> torch.Tensor:
    """Causal attention of each packed sequence to itself: (T, H, D) bf16 `q`, `k`, `v` and the pack's int32
    cu_seqlens (at most `slots` sequences of at most S_MAX tokens: see `usable`); (T, H, D) out."""
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    return _forward(q.contiguous(), k.contiguous(), v.contiguous(), cu, float(scale), slots)[0]
