"""cuDNN's fused attention over packs of unequal lengths (THD layout: tokens x heads x dim, sequence starts as
ragged offsets), through cuDNN's own Python frontend: a candidate kernel for the chat mix, measured by
`python -m bench.attn_kernels --mix` (path "cudnn_frontend_ragged").

Why: on the mix, flash's varlen kernel (the engine's and Unsloth's) costs as much per layer as cuDNN on four full
rows with three times the work (docs/benchmarks.md, sixth session). torch 2.11's own ragged cuDNN call measured
~90x slower with wrong gradients; this one builds cuDNN graphs itself, with fixed extents (at most B_MAX
sequences of at most S_MAX tokens): a pack's lengths are data (sequence lengths and offsets, zero-length
sequences filling the unused slots), so every layer and step reuses the same built plans.

Needs `nvidia-cudnn-frontend` (carried to the device by bench/carry_wheels.sh; not a project dependency) and a
cuDNN >= 9.10 loaded by torch.
"""

from __future__ import annotations

import functools
import math
from typing import Any

B_MAX = 64  # sequences in one pack (the chat mix's 4 x 2,048-token packs hold 18-26)
S_MAX = 2048  # tokens in one sequence


@functools.cache
def _cudnn() -> Any:
    import torch  # noqa: F401 - loads libcudnn, which the frontend then finds by its soname

    import cudnn

    return cudnn


@functools.cache
def _handle() -> Any:
    return _cudnn().create_handle()


def _thd(graph: Any, name: str, b: int, heads: int, dim: int, ragged: Any, dtype: Any) -> Any:
    """A (b, heads, S_MAX, dim) tensor stored as packed rows of heads x dim, placed by `ragged`."""
    t = graph.tensor(name=name, dim=[b, heads, S_MAX, dim], stride=[S_MAX * heads * dim, dim, heads * dim, 1],
                     data_type=dtype)
    t.set_ragged_offset(ragged)
    return t


def _as_thd(t: Any, b: int, heads: int, dim: int, ragged: Any, dtype: Any) -> Any:
    return (t.set_output(True).set_dim([b, heads, S_MAX, dim])
            .set_stride([S_MAX * heads * dim, dim, heads * dim, 1]).set_data_type(dtype).set_ragged_offset(ragged))


def _finish(graph: Any) -> Any:
    cudnn = _cudnn()
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    return graph


@functools.cache
def graphs(b: int, heads: int, dim: int, max_tokens: int) -> dict[str, Any]:
    """The forward and backward graphs for `b` sequences of `heads` x `dim` (causal, padding mask from the
    sequence lengths), with their tensors by name; built once per shape (pure after the first call)."""
    cudnn = _cudnn()
    bf16, f32, i32 = cudnn.data_type.BFLOAT16, cudnn.data_type.FLOAT, cudnn.data_type.INT32
    scale = 1.0 / math.sqrt(dim)
    out: dict[str, Any] = {}
    for kind in ("fwd", "bwd"):
        g = cudnn.pygraph(io_data_type=bf16, intermediate_data_type=f32, compute_data_type=f32, handle=_handle())
        small = dict(dim=[b + 1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=i32)
        t = {n: g.tensor(name=n, **small) for n in ("ragged_qkv", "ragged_o")}
        t.update({n: g.tensor(name=n, dim=[b, 1, 1, 1], stride=[1, 1, 1, 1], data_type=i32)
                  for n in ("seq_q", "seq_kv")})
        t.update({n: _thd(g, n, b, heads, dim, t["ragged_qkv"], bf16) for n in ("q", "k", "v")})
        mask = dict(attn_scale=scale, use_padding_mask=True, seq_len_q=t["seq_q"], seq_len_kv=t["seq_kv"],
                    diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT, diagonal_band_right_bound=0)
        if kind == "fwd":
            o, stats = g.sdpa(name="sdpa", q=t["q"], k=t["k"], v=t["v"], generate_stats=True, **mask)
            t["o"] = _as_thd(o, b, heads, dim, t["ragged_o"], bf16)
            t["stats"] = stats.set_output(True).set_data_type(f32).set_dim([b, heads, S_MAX, 1]).set_stride(
                [heads * S_MAX, S_MAX, 1, 1])
        else:
            t["o"] = _thd(g, "o", b, heads, dim, t["ragged_o"], bf16)
            t["do"] = _thd(g, "do", b, heads, dim, t["ragged_o"], bf16)
            t["stats"] = g.tensor(name="stats", dim=[b, heads, S_MAX, 1], stride=[heads * S_MAX, S_MAX, 1, 1],
                                  data_type=f32)
            dq, dk, dv = g.sdpa_backward(name="sdpa_bwd", q=t["q"], k=t["k"], v=t["v"], o=t["o"], dO=t["do"],
                                         stats=t["stats"], max_total_seq_len_q=max_tokens,
                                         max_total_seq_len_kv=max_tokens, **mask)
            t.update({n: _as_thd(x, b, heads, dim, t["ragged_qkv"], bf16) for n, x in (("dq", dq), ("dk", dk),
                                                                                        ("dv", dv))})
        out[kind] = (_finish(g), t)
    return out


def _run(kind: str, b: int, heads: int, dim: int, max_tokens: int, buffers: dict[str, Any]) -> None:
    import torch

    cudnn = _cudnn()
    graph, t = graphs(b, heads, dim, max_tokens)[kind]
    work = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device="cuda")
    cudnn.set_stream(handle=_handle(), stream=torch.cuda.current_stream().cuda_stream)
    graph.execute({t[n]: buf for n, buf in buffers.items()}, work, handle=_handle())


def pack_meta(lengths: list[int], heads: int, dim: int, slots: int | None = B_MAX) -> dict[str, Any]:
    """Sequence lengths (`slots` of them, zero past the pack's; None: exactly the pack's) and ragged offsets in
    elements, on the GPU."""
    import torch

    b = slots or len(lengths)
    if len(lengths) > b or max(lengths) > S_MAX:
        raise ValueError(f"a pack of {len(lengths)} sequences up to {max(lengths)} tokens: at most {b} x {S_MAX}")
    seq = torch.zeros(b, dtype=torch.int32)
    seq[:len(lengths)] = torch.tensor(lengths, dtype=torch.int32)
    ragged = torch.zeros(b + 1, dtype=torch.int32)
    ragged[1:] = seq.cumsum(0) * heads * dim
    return {"b": b, "seq": seq.view(-1, 1, 1, 1).cuda(), "ragged": ragged.view(-1, 1, 1, 1).cuda()}


class _RaggedAttention:
    """torch.autograd.Function over the two graphs (made lazily: torch is imported on first use)."""

    fn: Any = None

    @classmethod
    def get(cls) -> Any:
        if cls.fn is None:
            import torch

            class Fn(torch.autograd.Function):
                @staticmethod
                def forward(ctx: Any, q: Any, k: Any, v: Any, meta: dict[str, Any], max_tokens: int) -> Any:
                    _, heads, dim = q.shape
                    o = torch.empty_like(q)
                    stats = torch.empty(meta["b"], heads, S_MAX, 1, dtype=torch.float32, device=q.device)
                    _run("fwd", meta["b"], heads, dim, max_tokens, {
                        "q": q, "k": k, "v": v, "o": o, "stats": stats, "seq_q": meta["seq"],
                        "seq_kv": meta["seq"], "ragged_qkv": meta["ragged"], "ragged_o": meta["ragged"]})
                    ctx.save_for_backward(q, k, v, o, stats)
                    ctx.meta, ctx.max_tokens = meta, max_tokens
                    return o

                @staticmethod
                def backward(ctx: Any, grad: Any) -> Any:
                    q, k, v, o, stats = ctx.saved_tensors
                    _, heads, dim = q.shape
                    dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
                    meta = ctx.meta
                    _run("bwd", meta["b"], heads, dim, ctx.max_tokens, {
                        "q": q, "k": k, "v": v, "o": o, "do": grad.contiguous(), "stats": stats, "dq": dq, "dk": dk,
                        "dv": dv, "seq_q": meta["seq"], "seq_kv": meta["seq"], "ragged_qkv": meta["ragged"],
                        "ragged_o": meta["ragged"]})
                    return dq, dk, dv, None, None

            cls.fn = Fn
        return cls.fn


def ragged_attention(q: Any, k: Any, v: Any, meta: dict[str, Any], max_tokens: int = 4 * S_MAX) -> Any:
    """Causal attention of each packed sequence to itself: q, k, v (tokens, heads, dim) bf16 contiguous; `meta`
    from `pack_meta`. Returns (tokens, heads, dim)."""
    return _RaggedAttention.get().apply(q.contiguous(), k.contiguous(), v.contiguous(), meta, max_tokens)
