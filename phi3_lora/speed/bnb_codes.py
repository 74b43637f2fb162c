"""Exact cuts of bitsandbytes 4-bit weights: the packed codes and block scales a Linear4bit's forward uses.

`fused` splits Phi-3's fused layers into slices; cutting the codes (2 per byte) and the per-block scales keeps
the weights bit-identical, where dequantising and re-quantising each slice moves them (~0.4% of the max logit
on a tiny Phi-3). That reads QuantState's fields and calls a private bitsandbytes function (the inverse of its
CPU repacking), so it runs only with the bitsandbytes version it was tested with (`versions`); otherwise
`codes_4bit` returns None and the caller re-quantises.
"""

from __future__ import annotations

import torch
from torch import nn

from phi3_lora.speed import versions


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense tensor (4-bit weights are dequantised)."""
    if type(linear).__name__ != "Linear4bit":
        return linear.weight.data
    import bitsandbytes as bnb

    weight = linear.weight
    parts = codes_4bit(linear)
    if parts is None:
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    codes, absmax, dtype = parts
    state = weight.quant_state
    plain = bnb.functional.QuantState(absmax=absmax, shape=torch.Size([linear.out_features, linear.in_features]),
                                      code=state.code, blocksize=state.blocksize, quant_type=state.quant_type,
                                      dtype=dtype)
    return bnb.functional.dequantize_4bit(codes.reshape(-1, 1), plain)


def codes_4bit(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.dtype] | None:
    """(packed 4-bit codes as flat bytes, per-block absmax in float32, dequant dtype) of a Linear4bit: exactly
    what its forward uses. None when the storage is not uint8 codes (then it is re-quantised)."""
    import copy

    import bitsandbytes as bnb

    if not versions.tested("fused_4bit_codes"):  # QuantState internals and a private function: re-quantise
        return None
    data, state = linear.weight.data, linear.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bnb repacked it for CPU inference (codes reordered, scales unnested to bf16, transposed); its inverse
        # re-compresses the scales in place, so undo only the code order, on a copy, and keep the bf16 scales.
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
        absmax, dtype = state.absmax.T.reshape(-1).float(), state.original_dtype
        data, _ = _convert_weight_packed_for_cpu_inverse(data, copy.copy(state))
    else:
        absmax, dtype = state.absmax, state.dtype
        if state.nested:  # double quantisation: the scales are 8-bit themselves; dequant uses these values
            absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    if data.dtype != torch.uint8:
        return None
    return data.reshape(-1), absmax.float().reshape(-1), dtype


def linear4bit_from_codes(template: nn.Module, codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype,
                          out_features: int, bias: torch.Tensor | None) -> nn.Module:
    """A Linear4bit holding exactly these codes and block scales (scales kept in float32, not re-compressed)."""
    import bitsandbytes as bnb

    old = template.weight
    state = old.quant_state
    in_features = template.in_features
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=template.compute_dtype,
                              compress_statistics=False, quant_type=old.quant_type, quant_storage=old.quant_storage,
                              device="meta")
    new_state = bnb.functional.QuantState(absmax=absmax.clone(), shape=torch.Size([out_features, in_features]),
                                          code=state.code, blocksize=state.blocksize, quant_type=state.quant_type,
                                          dtype=dtype)
    layer.weight = bnb.nn.Params4bit(codes.clone().reshape(-1, 1), requires_grad=False, quant_state=new_state,
                                     blocksize=state.blocksize, compress_statistics=False, quant_type=old.quant_type,
                                     quant_storage=old.quant_storage, module=layer, bnb_quantized=True)
    layer.quant_state = new_state
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=template.bias.requires_grad)
    return layer.train(template.training)
