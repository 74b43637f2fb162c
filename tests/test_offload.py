"""Offloading activations (phi3_lora.offload) changes where tensors wait, never what is computed: the same
loss and bit-identical LoRA gradients as the plain step, with LoRA dropout on (so the recompute must replay
the same masks), for checkpointed layers with their input offloaded, layers with all saved tensors offloaded,
and a mix. On the CPU the "host" copies are real copies, so a wrong view, offset or order shows here."""

from __future__ import annotations

import pytest
import torch

from phi3_lora.speed import lean_lora, offload


def _model(tiny_phi3_dir, lean: bool) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    from phi3_lora.config import ModelSettings
    from phi3_lora.models import load_model

    torch.manual_seed(0)
    model = load_model(ModelSettings(name=str(tiny_phi3_dir), load_in_4bit=False, dtype="float32"))
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:  # as after some training: B = 0 would hide a wrong input gradient
                p.normal_(0, 0.05)
    if lean:
        lean_lora.install(peft)
    return peft.train()


def _step(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(5)  # the same dropout masks in every variant
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lean", [True], ids=["lean_lora"])
def test_offloaded_layers_give_identical_gradients(tiny_phi3_dir, monkeypatch, lean):
    monkeypatch.setattr(offload, "MIN_BYTES", 0)  # the tiny model's tensors are small: offload every one
    ids = torch.randint(10, 30000, (2, 24))
    ref_loss, ref = _step(_model(tiny_phi3_dir, lean), ids)
    n = len(offload.decoder_layers(_model(tiny_phi3_dir, lean)))
    assert n >= 2
    plans = {"inputs of checkpointed layers": (list(range(n)), []),
             "saved tensors of every layer": ([], list(range(n))),
             "mixed": (list(range(0, n, 2)), list(range(1, n, 2)))}
    for label, (ckpt, off) in plans.items():
        model = _model(tiny_phi3_dir, lean)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        offload.install(model, checkpointed=ckpt, offloaded=off)
        loss, grads = _step(model, ids)
        copies = model._phi3_offload_copies
        assert copies.stored >= len(ckpt) + len(off), label  # something really went through host copies
        assert loss == ref_loss, label
        assert grads.keys() == ref.keys(), label
        for name in ref:
            assert torch.equal(grads[name], ref[name]), (label, name)
