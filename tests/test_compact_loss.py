"""speed.compact_loss: on the CPU trl's loss head scores only the labelled positions, with the same loss and
gradients as when it scores every position."""

from __future__ import annotations

import pytest
import torch
from helpers.training import loss_and_grads, tiny_config, trainable_lora, varied_rows

from phi3_lora import train
from phi3_lora.speed import compact_loss


def test_labelled_positions_only_same_loss_and_gradients(tmp_path, tiny_llama_dir, monkeypatch):
    import trl.trainer.utils as trl_utils

    cfg = tiny_config(tiny_llama_dir, varied_rows(tmp_path / "d.jsonl"), max_steps=1).replace(
        model={"load_in_4bit": False, "dtype": "float32"}, data={"eval_fraction": 0.0})
    built = train.build(cfg, tmp_path / "run")
    assert built.device == "cpu" and built.opts.compact_loss and compact_loss.installed()
    trainer = built.trainer
    trainable_lora(trainer)
    batch = next(iter(trainer.get_train_dataloader()))
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert 0 < labelled < batch["labels"][:, 1:].numel()

    rows_scored = []
    real_apply = trl_utils._ChunkedLogProbFunction.apply

    def counting_apply(hidden, *args):
        rows_scored.append(hidden.shape[0])
        return real_apply(hidden, *args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", counting_apply)
    compact, compact_grads = loss_and_grads(trainer, batch)
    try:
        compact_loss.uninstall()
        assert not compact_loss.installed()
        full, full_grads = loss_and_grads(trainer, batch)
    finally:
        compact_loss.install()
    assert rows_scored == [labelled, batch["labels"][:, 1:].numel()]
    torch.testing.assert_close(compact, full, rtol=1e-5, atol=1e-6)
    assert compact_grads.keys() == full_grads.keys() and any("lora_A" in n for n in compact_grads)
    for name, g in compact_grads.items():
        torch.testing.assert_close(g, full_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_install_is_idempotent_and_leaves_cuda_to_trl():
    import trl.trainer.utils as trl_utils

    if not compact_loss.install():
        pytest.skip("trl is not the tested version: the stock path")
    first = trl_utils._use_triton
    assert compact_loss.install() and trl_utils._use_triton is first
    assert first(torch.device("cpu"))
    assert first(torch.device("cuda")) == getattr(first, "_phi3_original")(torch.device("cuda"))
