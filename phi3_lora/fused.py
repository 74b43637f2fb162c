"""LoRA on slices of fused projections: Phi-3's qkv_proj (q, k, v) and gate_up_proj (gate, up).

peft adapts whole modules, so to adapt only q and v of a fused qkv_proj we first replace the fused
`Linear` with a `FusedSlices` module whose children `q_proj`, `k_proj`, `v_proj` are separate
Linear layers holding copies of the fused weight's rows, and whose forward concatenates their
outputs in the fused order. Phi-3's attention then slices that output exactly as before, and peft
sees ordinary Linear layers it can target by name (`q_proj`, `v_proj`). After merging, `restore_fused_layers`
concatenates the rows back into one Linear, so the exported model is a stock Phi-3.

peft has no notion of row slices of one weight (loralib's MergedLinear has; re-implementing it would
be a second LoRA implementation), hence this module. How the two settings combine:

- `lora.target_modules` is resolved against the unsplit model as usual ('all-linear' or names);
- each fused layer that `lora.fused_slices` touches (qkv_proj for q/k/v, gate_up_proj for gate/up) is
  split, and its whole-layer target is replaced by the chosen slices; other layers stay as listed.
  So `target_modules: [qkv_proj]` + `fused_slices: [q, v]` adapts exactly q and v (the LoRA paper's
  setting), and `all-linear` + `[q, v]` adapts q, v, o_proj, gate_up_proj and down_proj.

Marker for loaders: a split adapter's weight names carry the layout (`...qkv_proj.q_proj.lora_A.weight`);
`split_needed` reads it from an adapter folder or a saved state dict, so checkpoints need no side file.
Which fused layers a model has and how their rows split is the family's (phi3_lora.families); which of
them to split for a LoraSettings is `targets.plan`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from phi3_lora import families
from phi3_lora.speed.bnb_codes import codes_4bit, dense_weight, is_4bit, linear4bit_from_codes
from phi3_lora.families import child_name


def _split_key() -> re.Pattern[str]:
    """`...<fused>.<slice>_proj.` in an adapter's weight names: the layout a split adapter was trained on."""
    fused = families.all_fused()
    slices = sorted({s for group in fused.values() for s in group})
    return re.compile(rf"(?:^|\.)({'|'.join(map(re.escape, fused))})\.({'|'.join(slices)})_proj\.")


_SPLIT_KEY = _split_key()


def slice_sizes(config: Any, fused_name: str) -> dict[str, int]:
    """Output rows of each slice of `fused_name` in a model with this config (its family knows the layout)."""
    return families.family_of(config).slice_sizes(config, fused_name)


class FusedSlices(nn.Module):
    """Stands in for a fused Linear: one child Linear per slice, outputs concatenated in fused order."""

    def __init__(self, children: dict[str, nn.Module]) -> None:
        super().__init__()
        self.slice_names = list(children)
        for name, module in children.items():
            self.add_module(name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self, n)(x) for n in self.slice_names], dim=-1)


# --- split and restore ------------------------------------------------------------------------------

def _linear_like(template: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A new layer of the template's kind holding `weight` (re-quantised for 4-bit); shares no storage."""
    out_features, in_features = weight.shape
    device = template.weight.device
    if is_4bit(template):
        import bitsandbytes as bnb

        old = template.weight
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None,
                                  compute_dtype=template.compute_dtype, compress_statistics=old.compress_statistics,
                                  quant_type=old.quant_type, quant_storage=old.quant_storage, device="meta")
        layer.weight = bnb.nn.Params4bit(weight.contiguous().clone(), requires_grad=False, blocksize=old.blocksize,
                                         compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                                         quant_storage=old.quant_storage, module=layer).to(device)
    else:
        layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta", dtype=weight.dtype)
        layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=template.weight.requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone().to(device), requires_grad=template.bias.requires_grad)
    return layer.train(template.training)


def _split_one(linear: nn.Module, sizes: dict[str, int], where: str, requantize: bool = False) -> FusedSlices:
    if sum(sizes.values()) != linear.out_features:
        raise ValueError(f"{where}: slices {sizes} do not add up to its {linear.out_features} output rows")
    n = linear.in_features
    parts = codes_4bit(linear) if is_4bit(linear) and not requantize else None
    block = linear.weight.quant_state.blocksize if parts is not None else 1
    if any(rows * n % block for rows in sizes.values()):
        parts = None  # a slice boundary inside a quantisation block: re-quantise instead
    weight = dense_weight(linear) if parts is None else None
    children, start = {}, 0
    for name, rows in sizes.items():
        bias = linear.bias[start:start + rows] if linear.bias is not None else None
        if parts is not None:  # 4-bit: cut the codes (2 per byte) and the block scales: bit-identical weights
            codes, absmax, dtype = parts
            layer = linear4bit_from_codes(linear, codes[start * n // 2:(start + rows) * n // 2],
                                     absmax[start * n // block:(start + rows) * n // block], dtype, rows, bias)
        else:
            layer = _linear_like(linear, weight[start:start + rows], bias)
        children[child_name(name)] = layer
        start += rows
    return FusedSlices(children)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def split_fused_layers(model: nn.Module, groups: Iterable[str], requantize: bool = False) -> int:
    """Replace every fused Linear named in `groups` by an equivalent FusedSlices; returns how many.

    4-bit layers are cut at their packed codes and block scales (bit-identical weights; the slices keep their
    scales in float32, ~0.4 bit/param more than double quantisation). `requantize=True` (or a slice boundary
    inside a quantisation block) dequantises and re-quantises each slice instead.
    """
    groups = set(groups)
    if not groups:
        return 0
    config = model.config
    found = [(p, m) for p, m in model.named_modules() if p.rsplit(".", 1)[-1] in groups and isinstance(m, nn.Linear)]
    with torch.no_grad():
        for path, linear in found:
            _replace(model, path, _split_one(linear, slice_sizes(config, path.rsplit(".", 1)[-1]), path, requantize))
    return len(found)


def split_groups(model: nn.Module) -> tuple[str, ...]:
    """Fused leaf names that are currently split in `model`."""
    return tuple(dict.fromkeys(p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, FusedSlices)))


def restore_fused_layers(model: nn.Module) -> nn.Module:
    """Put each FusedSlices back as one fused Linear (rows concatenated): the stock layout for export.

    Call it after `merge_and_unload()`: LoRA-wrapped children have nothing plain to concatenate.
    """
    found = [(p, m) for p, m in model.named_modules() if isinstance(m, FusedSlices)]
    with torch.no_grad():
        for path, module in found:
            parts = [getattr(module, n) for n in module.slice_names]
            if not all(isinstance(p, nn.Linear) and not hasattr(p, "base_layer") for p in parts):
                raise ValueError(f"{path} still carries LoRA layers: merge the adapter (merge_and_unload) first")
            biases = [p.bias for p in parts]
            bias = torch.cat(biases) if all(b is not None for b in biases) else None
            codes = [codes_4bit(p) if is_4bit(p) else None for p in parts]
            if all(c is not None for c in codes):  # 4-bit: concatenate codes and scales, no re-quantisation
                fused = linear4bit_from_codes(parts[0], torch.cat([c[0] for c in codes]),
                                              torch.cat([c[1] for c in codes]), codes[0][2],
                                              sum(p.out_features for p in parts), bias)
            else:
                fused = _linear_like(parts[0], torch.cat([dense_weight(p) for p in parts], dim=0), bias)
            _replace(model, path, fused)
    return model


# --- loaders: split the base the way an adapter was trained -----------------------------------------

def split_in_keys(keys: Iterable[str]) -> tuple[str, ...]:
    """Fused layers split in the model that produced these state-dict keys."""
    return tuple(dict.fromkeys(m.group(1) for k in keys if (m := _SPLIT_KEY.search(k))))


def split_needed(adapter: str | Path | Mapping[str, Any]) -> tuple[str, ...]:
    """Fused layers an adapter (folder, .safetensors file or state dict) expects split."""
    if isinstance(adapter, Mapping):
        return split_in_keys(adapter.keys())
    path = Path(adapter)
    if path.is_dir():
        path = path / "adapter_model.safetensors"
    if not path.is_file():
        return ()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return split_in_keys(f.keys())


def prepare_base(model: nn.Module, adapter: str | Path | Mapping[str, Any]) -> tuple[str, ...]:
    """Split `model`'s fused layers as `adapter` needs (idempotent); returns the groups it needs."""
    needed = split_needed(adapter)
    split_fused_layers(model, [g for g in needed if g not in split_groups(model)])
    return needed
