"""16-bit copies of the frozen 4-bit weights (speed/dequantized.py): the same step, planned only where they fit."""

from __future__ import annotations

import pytest
import torch

from helpers.tiny_models import strong_lora_b
from phi3_lora import options
from phi3_lora.config import RunConfig
from phi3_lora.estimate import LayerKeeps, estimate_memory, model_shape
from phi3_lora.options import dequantized_layers, planned_memory, resolve_options
from phi3_lora.speed import dequantized
from phi3_lora.speed.layers import decoder_layers
from tests.test_options import PHI3_MINI


def _four_bit_lora(tiny_phi3_dir):
    from peft import LoraConfig, get_peft_model

    from phi3_lora.config import ModelSettings
    from phi3_lora.models import load_model

    torch.manual_seed(0)
    model = load_model(ModelSettings(name=str(tiny_phi3_dir), load_in_4bit=True, dtype="float32"))
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    return strong_lora_b(peft).train()


def _step(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_copies_give_the_same_logits_and_gradients_and_come_off_again(tiny_phi3_dir):
    model = _four_bit_lora(tiny_phi3_dir)
    ids = torch.randint(10, 30000, (2, 16))
    ref_logits, ref_grads = _step(model, ids)
    layers = decoder_layers(model)
    four_bit = [m for m in layers[0].modules() if isinstance(m, dequantized.four_bit_classes())]
    assert four_bit, "the tiny model's decoder layers are 4-bit"

    changed = dequantized.install(layers[:1])
    assert changed == len(four_bit) and dequantized.install(layers[:1]) == 0  # idempotent
    copy = four_bit[0]._phi3_dequantized
    assert copy.shape == tuple(four_bit[0].weight.quant_state.shape)
    assert dequantized.copy_bytes(layers) == sum(m.weight.quant_state.shape.numel() for m in four_bit) * 4
    assert not any("_phi3_dequantized" in k for k in model.state_dict())  # nothing saved or exported
    logits, grads = _step(model, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)

    # the copy is what the layer multiplies by: change it and the output moves
    with torch.no_grad():
        copy.mul_(2.0)
    assert not torch.allclose(_step(model, ids)[0], ref_logits, atol=1e-3)
    assert dequantized.uninstall(model) == len(four_bit)
    assert dequantized.copy_bytes(layers) == 0
    torch.testing.assert_close(_step(model, ids)[0], ref_logits, rtol=0, atol=1e-5)


def _config(**train):
    return RunConfig().replace(model={"load_in_4bit": True},
                               train={"max_length": 2048, "per_device_train_batch_size": 4, **train},
                               lora={"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"})


def test_copies_are_planned_after_every_activation_and_counted(monkeypatch):
    config = _config()
    layers = model_shape(PHI3_MINI).num_layers
    assert dequantized_layers(PHI3_MINI, config, 139.0, "bfloat16") == layers  # a whole H200: every layer
    assert dequantized_layers(PHI3_MINI, config, 24.0, "bfloat16") == 0  # the activations alone do not fit
    some = dequantized_layers(PHI3_MINI, config, 28.0, "bfloat16")
    assert 0 < some < layers
    one = estimate_memory(PHI3_MINI, config, recomputed_layers=0, keeps=LayerKeeps(), dequantized_layers=1)
    none = estimate_memory(PHI3_MINI, config, recomputed_layers=0, keeps=LayerKeeps())
    per_layer = sum(a * b for a, b in model_shape(PHI3_MINI).block_linear_shapes.values()) * 2 / 2**30
    assert one.weights_gib - none.weights_gib == pytest.approx(per_layer)
    fits = estimate_memory(PHI3_MINI, config, recomputed_layers=0, keeps=LayerKeeps(), dequantized_layers=some)
    assert fits.total_gib <= options.BUDGET_SHARE * 28.0

    monkeypatch.setattr(options, "DEQUANTIZE_FROZEN", True)
    kw = dict(liger_installed=True, varlen_available=True, model_config=PHI3_MINI, gpu_memory_gb=139.0)
    whole = resolve_options(config, "cuda", "bfloat16", **kw)
    assert whole.dequantized_layers == layers and not whole.gradient_checkpointing
    shown = planned_memory(PHI3_MINI, config, "cuda", liger_installed=True, gpu_memory_gb=139.0)
    # measured on the H200 (docs/benchmarks.md, 2026-12-02): compiled layers with every copy peaked at 39.37 GiB
    assert 39.37 <= shown.total_gib <= 39.37 + 2
    assert shown.dequantized_layers == layers and "16-bit copies of 32 of 32" in __import__(
        "phi3_lora.estimate", fromlist=["describe"]).describe(shown)
    assert resolve_options(_config(memory_budget_gb=24), "cuda", "bfloat16", **kw).dequantized_layers == 0
    sixteen = RunConfig().replace(model={"load_in_4bit": False})
    assert resolve_options(sixteen, "cuda", "bfloat16", **kw).dequantized_layers == 0  # nothing 4-bit to copy
    assert resolve_options(config, "cpu", "bfloat16", **kw).dequantized_layers == 0
