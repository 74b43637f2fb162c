"""Reading bitsandbytes 4-bit weights: the standard NF4 layout, dense values, and exact cuts of the packed codes.

bitsandbytes' `Linear4bit.forward` on a CPU with AVX512-BF16, in eval mode with an input that needs no grad,
repacks the weight in place for its CPU kernel (codes reordered, scales un-nested to bf16 and transposed) and
flags the QuantState `packing_format_for_cpu`. Read as the standard layout after that, the weight is garbage
(a Compare, then a fused-layer split). So every read of a 4-bit weight's data or QuantState goes through this
module: `standard_layout` puts a repacked weight back first (a flag check when nothing is packed).

`fused` splits Phi-3's fused layers into slices; cutting the codes (2 per byte) and the per-block scales keeps
the weights bit-identical, where dequantising and re-quantising each slice moves them (~0.4% of the max logit
on a tiny Phi-3). That reads QuantState's fields, and undoing the CPU repacking calls a private bitsandbytes
function, so both run only with the bitsandbytes version they were tested with (`versions`); otherwise
`codes_4bit` returns None and the caller re-quantises from `dense_weight`, which reads a repacked weight through
the layer's own public forward instead.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from phi3_lora.speed import versions


def is_4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit"


def _cpu_packed(linear: nn.Module) -> bool:
    return bool(getattr(getattr(linear.weight, "quant_state", None), "packing_format_for_cpu", False))


def standard_layout(linear: nn.Module) -> bool:
    """Put a Linear4bit's weight back in bitsandbytes' standard layout in place if its CPU inference repacked it.
    True when the weight is (now) in the standard layout; False when it stays repacked (untested bitsandbytes).

    bnb's own inverse (`_convert_weight_packed_for_cpu_inverse`, what `.cuda()` and saving call) re-compresses
    nested scales to 8 bits (they move again) and leaves un-nested ones transposed (bitsandbytes 0.50.2: wrong
    block order once in_features > blocksize). So it undoes only the code order here, on a copy of the state, and
    the scales stay the bf16 values the repacked forward used, in float32, un-nested: the same weights, and a
    later repack and restore round-trips them exactly.
    """
    if not _cpu_packed(linear):
        return True
    if not versions.tested("fused_4bit_codes"):  # a private function on an untested version: leave it as it is
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight = linear.weight
    state = weight.quant_state
    absmax = state.absmax.T.reshape(-1).float().contiguous()  # repacked: [in/blocksize, out] bf16
    data, _ = _convert_weight_packed_for_cpu_inverse(weight.data, copy.copy(state))
    weight.data = data
    state.absmax, state.nested, state.state2, state.offset = absmax, False, None, None
    state.dtype = state.original_dtype
    state.packing_format_for_cpu = False
    return True


def keep_standard_layout(model: nn.Module) -> int:
    """Put back every repacked 4-bit weight of a model about to train, and keep bitsandbytes from repacking it
    in the trainer's evaluations; returns how many 4-bit layers. The repacked CPU kernel has no autograd
    (torch warns, and the gradient through the frozen weight is silently dropped for every step after an
    evaluation), and a checkpoint save runs bnb's own inverse on it (see standard_layout). The flag is the
    layer's own public attribute; an evaluation forward then takes bnb's standard CPU path."""
    layers = [m for m in model.modules() if is_4bit(m)]
    for layer in layers:
        standard_layout(layer)
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense tensor (4-bit weights are dequantised)."""
    if not is_4bit(linear):
        return linear.weight.data
    if not standard_layout(linear):
        return _dense_through_forward(linear)
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(linear.weight.data, linear.weight.quant_state)


def _dense_through_forward(linear: nn.Module) -> torch.Tensor:
    """W of a weight in a layout we do not read: the layer's own public forward of the identity, bias off.
    Costs one in x in by in x out product (rounded to the compute dtype), only on untested bitsandbytes."""
    bias = linear.bias
    eye = torch.eye(linear.in_features, dtype=torch.float32, device=linear.weight.device)
    try:
        linear.bias = None
        with torch.no_grad():
            return linear(eye).T.contiguous()
    finally:
        linear.bias = bias


def codes_4bit(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.dtype] | None:
    """(packed 4-bit codes as flat bytes, per-block absmax in float32, dequant dtype) of a Linear4bit: exactly
    what its forward uses. None when they cannot be read exactly (then the caller re-quantises)."""
    import bitsandbytes as bnb

    if not versions.tested("fused_4bit_codes"):  # QuantState internals and a private function: re-quantise
        return None
    if not standard_layout(linear):
        return None
    data, state = linear.weight.data, linear.weight.quant_state
    absmax = state.absmax
    if state.nested:  # double quantisation: the scales are 8-bit themselves; dequant uses these values
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    if data.dtype != torch.uint8:
        return None
    return data.reshape(-1), absmax.float().reshape(-1), state.dtype


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
