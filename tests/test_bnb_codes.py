"""Reading 4-bit weights after bitsandbytes repacked them for CPU inference (speed/bnb_codes.standard_layout).

On a CPU with AVX512-BF16, an eval-mode, no-grad forward of a Linear4bit rewrites its weight in place into a
CPU-only layout. Every reader (dense weight, codes, 16-bit copies, fused-layer split and restore) must see the
weights that forward used, not the repacked bytes read as NF4. Where the CPU lacks AVX512-BF16 the tests pack
with bitsandbytes' own packing function, so they run the same path on any CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from helpers.tiny_models import strong_lora_b
from phi3_lora import fused, models
from phi3_lora.config import ModelSettings
from phi3_lora.speed import bnb_codes, dequantized

bnb = pytest.importorskip("bitsandbytes")

IDS = torch.tensor([[1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203]])


def _linear4bit(nested: bool, in_features: int = 256, out_features: int = 96) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=torch.float32,
                              compress_statistics=nested, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features), requires_grad=False,
                                     compress_statistics=nested, quant_type="nf4", module=layer).to("cpu")
    layer.bias = torch.nn.Parameter(torch.randn(out_features), requires_grad=False)
    return layer.eval()


def _repack(layer: torch.nn.Module) -> None:
    """What Linear4bit.forward does on an AVX512-BF16 CPU in eval mode with no grad; packed directly elsewhere."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    if layer.support_avx512bf16_for_cpu:
        with torch.no_grad():
            layer(torch.zeros(1, layer.in_features))
    else:
        layer.weight.data, _ = _convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    assert layer.weight.quant_state.packing_format_for_cpu


def _from_codes(layer: torch.nn.Module) -> torch.Tensor:
    codes, absmax, dtype = bnb_codes.codes_4bit(layer)
    return bnb_codes.dense_weight(bnb_codes.linear4bit_from_codes(layer, codes, absmax, dtype, layer.out_features,
                                                                  None))


READERS: dict[str, Callable[[torch.nn.Module], torch.Tensor]] = {
    "dense_weight": bnb_codes.dense_weight,
    "codes": _from_codes,
    "dequantized_copy": dequantized.dequantize,
}


@pytest.mark.parametrize("reader", READERS, ids=list(READERS))
@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "plain-scales"])
def test_a_repacked_layer_reads_as_the_weights_its_forward_used(nested: bool, reader: str) -> None:
    layer = _linear4bit(nested)
    fresh = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).clone()
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        _repack(layer)
        packed_out = layer(x) if layer.support_avx512bf16_for_cpu else None
    got = READERS[reader](layer).float()
    # The repacked forward multiplies by bf16 block scales: the weights may move by half a bf16 step, no more.
    # Read as NF4 without the restore (or with bnb's own inverse's transposed plain scales) they are garbage.
    torch.testing.assert_close(got, fresh, rtol=2 ** -8, atol=1e-6)
    assert not layer.weight.quant_state.packing_format_for_cpu
    if packed_out is not None:  # restored, the layer repacks on its next forward and answers exactly as before
        with torch.no_grad():
            assert torch.equal(layer(x), packed_out)


def test_restoring_twice_round_trips_the_weights_exactly() -> None:
    layer = _linear4bit(nested=True)
    _repack(layer)
    first = bnb_codes.dense_weight(layer).clone()
    assert bnb_codes.standard_layout(layer)  # nothing packed: a flag check
    _repack(layer)
    assert torch.equal(bnb_codes.dense_weight(layer), first)  # the bf16 scales survive another repack unchanged


def _phi3_4bit(tiny_phi3_dir: Path, double_quant: bool) -> torch.nn.Module:
    return models.load_model(ModelSettings(name=str(tiny_phi3_dir), load_in_4bit=True, dtype="float32",
                                           bnb_4bit_use_double_quant=double_quant), device="cpu").eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "plain-scales"])
def test_splitting_a_model_that_answered_matches_splitting_a_fresh_one(tiny_phi3_dir: Path,
                                                                       double_quant: bool) -> None:
    """Compare ran (eval, no grad: the 4-bit layers repacked), then an adapter trained on slices is loaded."""
    answered, fresh = _phi3_4bit(tiny_phi3_dir, double_quant), _phi3_4bit(tiny_phi3_dir, double_quant)
    _logits(answered)
    groups = ["qkv_proj", "gate_up_proj"]
    for path, module in answered.named_modules():
        if path.rsplit(".", 1)[-1] not in groups:
            continue
        if not getattr(module.weight.quant_state, "packing_format_for_cpu", False):  # unset on an AVX2-only CPU
            _repack(module)  # a CPU without AVX512-BF16: pack as its forward would have
    fused.split_fused_layers(answered, groups)
    fused.split_fused_layers(fresh, groups)
    reference = _logits(fresh)
    # The repacked layers' block scales are bf16 values: within one bf16 step (2^-8) of the logits' scale, where a
    # split that read the repacked codes in the wrong order is off by the scale itself (the AVX2-only EPYC: 1.4e-3)
    scale = reference.abs().max() * 2**-8
    assert (_logits(answered) - reference).abs().max() <= scale
    fused.restore_fused_layers(answered)  # the slices repacked in that forward: restore reads them too
    fused.restore_fused_layers(fresh)
    assert (_logits(answered) - _logits(fresh)).abs().max() <= scale


def _cpu_repacks() -> bool:
    return bool(_linear4bit(nested=True, in_features=64, out_features=32).support_avx512bf16_for_cpu)


@pytest.mark.skipif(not _cpu_repacks(), reason="this CPU has no AVX512-BF16: bitsandbytes never repacks here")
@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "plain-scales"])
def test_training_after_an_evaluation_keeps_the_gradients_and_a_checkpoint_keeps_the_weights(
        tiny_phi3_dir: Path, double_quant: bool) -> None:
    """The trainer evaluates (eval mode, no grad), trains on, and saves checkpoints: the same steps as a run
    that never evaluated, and saving the adapter leaves the 4-bit base as it was."""
    from peft import get_peft_model_state_dict

    from phi3_lora import lora_attach, options
    from phi3_lora.config import RunConfig

    config = RunConfig().replace(model={"name": str(tiny_phi3_dir), "load_in_4bit": True, "dtype": "float32",
                                        "bnb_4bit_use_double_quant": double_quant},
                                 lora={"target_modules": "all-linear", "lora_dropout": 0.0})
    opts = options.resolve_options(config, "cpu", "float32", liger_installed=False)
    ids = torch.randint(10, 30000, (2, 16), generator=torch.Generator().manual_seed(0))

    def attached() -> torch.nn.Module:
        torch.manual_seed(0)
        model = lora_attach.attach_lora(models.load_model(config.model, device="cpu"), config, opts)
        return strong_lora_b(model)

    def step(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        model.train().zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    never, evaluated = attached(), attached()
    expected = step(never)
    with torch.no_grad():
        evaluated.eval()(input_ids=ids)  # the trainer's evaluation
    got = step(evaluated)
    assert got.keys() == expected.keys()
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    get_peft_model_state_dict(evaluated)  # a checkpoint: state_dict() runs over the 4-bit base layers
    assert torch.equal(_logits(evaluated.eval()), _logits(never.eval()))
