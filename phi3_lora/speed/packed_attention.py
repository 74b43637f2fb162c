"""Attention for padding-free packed batches: each packed sequence sees only itself.

trl's padding-free collator flattens a batch into one row and passes the sequence boundaries
(`cu_seq_lens_q`, `max_length_q`) down to the attention layers. transformers' `sdpa` path turns
that row into a dense block-diagonal mask, which drops SDPA off its flash kernel (measured about
half the tokens/s of full rows on an H200). FlashAttention-2 has a varlen kernel but no wheel for
our torch; PyTorch ships its own (`torch.nn.attention.varlen.varlen_attn`, flash-based, CUDA).
transformers lets a project register an attention function (`AttentionInterface`), so this module
registers one, `sdpa_varlen`, that

- calls `varlen_attn` with the boundaries on CUDA,
- runs plain SDPA once per packed sequence on CPU (the same function, slower),
- is plain SDPA for everything else (padded batches, full rows, generation).

Our own code because no maintained library offers this path for our torch: flash-attn and the
Hub `kernels` need a compiled wheel or a download that a training machine may not have.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from phi3_lora import options
from phi3_lora.speed import cudnn_ragged, sdpa_backend, versions

NAME = "sdpa_varlen"


def _find_varlen() -> tuple[Any, frozenset[str]] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


# Looked up once, at import, and kept as a plain module value: the attention forward runs inside compiled decoder
# layers, where Dynamo traces through an `lru_cache` wrapper and warns of "potential silent incorrectness" in
# every GPU run's train.log (seen on an H200, bench/results/2026-12-04-gpu-flow-s18).
_VARLEN = _find_varlen()


def _varlen() -> tuple[Any, frozenset[str]] | None:
    return _VARLEN


def cuda_varlen_available() -> bool:
    """PyTorch has a varlen attention kernel, a CUDA GPU to run it, and versions this path was tested with."""
    return _varlen() is not None and torch.cuda.is_available() and versions.tested(NAME)


def register() -> str:
    """Make `attn_implementation="sdpa_varlen"` known to transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def mask(*args: Any, **kwargs: Any) -> Any:
        # No 2-D padding mask: full rows or a packed row; the boundaries travel as cu_seq_lens instead of a
        # dense block-diagonal mask. With padding, SDPA's own mask.
        if kwargs.get("attention_mask") is None:
            return None
        return sdpa_mask(*args, **kwargs)

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, mask)
    _skip_packed_mask_probe()
    return NAME


def _skip_packed_mask_probe() -> None:
    """transformers builds every causal mask through `masking_utils._preprocess_mask_arguments`, which, for
    position ids without a 2-D mask (a padding-free packed batch), asks on the host whether the row holds more
    than one sequence (`find_packed_sequence_indices`: `.all()` on a GPU tensor, a wait for the GPU at the start
    of every forward). This attention needs no mask there (`mask` above returns None: the boundaries travel as
    cu_seq_lens), so for it that case exits early with no mask; every other case and implementation is
    untouched. Idempotent; with untested transformers versions left alone."""
    from transformers import masking_utils

    original = masking_utils._preprocess_mask_arguments
    if getattr(original, "_phi3_lora", False) or not versions.tested(NAME):
        return

    def preprocess(config: Any, inputs_embeds: torch.Tensor, attention_mask: Any, past_key_values: Any = None,
                   *args: Any, **kwargs: Any) -> Any:
        if (options.SKIP_MASK_PROBE and getattr(config, "_attn_implementation", None) == NAME
                and attention_mask is None and past_key_values is None):
            return True, None, None, None, None, None, None  # early exit: create_*_mask returns None
        return original(config, inputs_embeds, attention_mask, past_key_values, *args, **kwargs)

    preprocess._phi3_lora = True  # type: ignore[attr-defined]
    masking_utils._preprocess_mask_arguments = preprocess


def _boundaries(position_ids: torch.Tensor) -> torch.Tensor:
    """cu_seqlens of one row of position ids: a new sequence starts wherever the position does not step by 1."""
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(torch.diff(pos) != 1).flatten() + 1
    edges = torch.tensor([0, pos.numel()], device=pos.device)
    return torch.cat([edges[:1], starts, edges[1:]]).to(torch.int32)


def _per_sequence_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: list[int],
                       scaling: float | None) -> torch.Tensor:
    """(H, T, D) tensors; causal SDPA within each [cu[i], cu[i+1]) slice. The reference path (CPU)."""
    if k.shape[0] != q.shape[0]:  # grouped-query attention
        k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
        v = v.repeat_interleave(q.shape[0] // v.shape[0], dim=0)
    parts = [torch.nn.functional.scaled_dot_product_attention(q[:, a:b], k[:, a:b], v[:, a:b], is_causal=True,
                                                              scale=scaling)
             for a, b in zip(cu[:-1], cu[1:])]
    return torch.cat(parts, dim=1)  # (H, T, D)


def _equal_length_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, length: int,
                       scaling: float | None) -> torch.Tensor:
    """(H, T, D) tensors holding `n` packed sequences of `length` tokens each (full-length rows): one causal SDPA
    call over them as a batch, (T, H, D) out. Dense kernels run here (cuDNN's where speed/sdpa_backend.py put it
    first: on an H200 1.14 ms forward + backward per Phi-3 layer against 1.64 for FlashAttention-2), and the
    boundaries need no reading (their count and the longest length are known), so nothing waits for the GPU."""
    def batched(t: torch.Tensor) -> torch.Tensor:  # (H, n*L, D) -> (n, H, L, D), a view
        return t.unflatten(1, (n, length)).transpose(0, 1)

    heads, kv_heads = q.shape[0], k.shape[0]
    out = torch.nn.functional.scaled_dot_product_attention(
        batched(q), batched(k), batched(v), is_causal=True, scale=scaling,
        **({"enable_gqa": True} if kv_heads != heads else {}))
    return out.transpose(1, 2).reshape(n * length, heads, q.shape[-1])  # (n, L, H, D) -> (T, H, D)


def _cuda_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                 scaling: float | None) -> torch.Tensor:
    """(T, H, D) tensors through PyTorch's flash varlen kernel, causal."""
    fn, params = _varlen()
    dtype = q.dtype
    if dtype not in (torch.float16, torch.bfloat16):  # the flash kernel takes 16-bit only (fp32-upcast runs)
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    kwargs: dict[str, Any] = {"scale": scaling}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return fn(q, k, v, cu, cu, max_len, max_len, **kwargs).to(dtype)


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention contract: (B, H, S, D) in, ((B, S, H, D), None) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, _, q_len, _ = query.shape
    packed = (attention_mask is None and q_len == key.shape[2] and q_len > 1 and dropout == 0.0
              and (kwargs.get("cu_seq_lens_q") is not None or kwargs.get("position_ids") is not None))
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    cu = kwargs.get("cu_seq_lens_q")
    rows = []
    for b in range(batch):
        if cu is None or batch > 1:  # no boundaries from the collator: read them off the position ids
            pos = kwargs["position_ids"]
            row_cu = _boundaries(pos[b if pos.shape[0] > 1 else 0])
            max_len = int(row_cu.diff().max())
        else:
            row_cu, max_len = cu.to(torch.int32), kwargs.get("max_length_q")
            max_len = int(max_len) if max_len is not None else int(row_cu.diff().max())
        # every packed sequence as long as the longest (all equal): one dense SDPA call, on the CPU (one call for
        # a loop) and on a GPU where cuDNN's kernel is put first (sdpa_backend; else the measured varlen kernel)
        if max_len * (row_cu.numel() - 1) == q_len and (not query.is_cuda or sdpa_backend.PREFERRED):
            out = _equal_length_sdpa(query[b], key[b], value[b], row_cu.numel() - 1, max_len, scaling)
        elif query.is_cuda and options.CUDNN_RAGGED and cudnn_ragged.usable(
                query[b].transpose(0, 1), key[b].transpose(0, 1), row_cu.numel() - 1, max_len):
            out = cudnn_ragged.ragged_attention(*(t[b].transpose(0, 1) for t in (query, key, value)), row_cu,
                                                scaling)  # (T, H, D); it makes them contiguous
        elif query.is_cuda and _varlen() is not None:
            out = _cuda_varlen(query[b].transpose(0, 1).contiguous(), key[b].transpose(0, 1).contiguous(),
                               value[b].transpose(0, 1).contiguous(), row_cu, max_len, scaling)  # (T, H, D)
        else:
            out = _per_sequence_sdpa(query[b], key[b], value[b], row_cu.tolist(), scaling).transpose(0, 1)
        rows.append(out)
    return (rows[0].unsqueeze(0) if batch == 1 else torch.stack(rows, dim=0)), None  # one row: no copy
