"""speed.label_positions: the loss head scores the labelled positions the collator found on the host, with the same
loss, per-token outputs and gradients as trl's own fused head (which finds them on the device, a wait per step).
The path is the GPU's default; here it is installed on the CPU, where trl's compacting path is compact_loss's."""

from __future__ import annotations

import pytest
import torch
from helpers.training import loss_and_grads, tiny_config, trainable_lora, varied_rows

from phi3_lora import train
from phi3_lora.speed import label_positions


def test_positions_are_the_labelled_next_tokens_in_row_major_order():
    labels = torch.tensor([[-100, 5, -100, 7], [1, -100, 2, 3]])
    # next-token labels: row 0 -> [5, -100, 7], row 1 -> [-100, 2, 3]
    assert label_positions.positions(labels).tolist() == [0, 2, 4, 5]


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "padding-free packed"])
def test_host_positions_give_trls_loss_outputs_and_gradients(tmp_path, tiny_llama_dir, monkeypatch, packing):
    import trl.trainer.utils as trl_utils

    cfg = tiny_config(tiny_llama_dir, varied_rows(tmp_path / "d.jsonl"), max_steps=1, packing=packing).replace(
        model={"load_in_4bit": False, "dtype": "float32"}, data={"eval_fraction": 0.0})
    built = train.build(cfg, tmp_path / "run")
    trainer = built.trainer
    assert not built.opts.host_label_positions  # a CPU run keeps trl's path; the GPU's default is this one
    trainable_lora(trainer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert label_positions.KEY not in batch
    trl_loss, trl_grads = loss_and_grads(trainer, batch)

    assert label_positions.install(trainer) and label_positions.install(trainer)  # idempotent
    taken = []
    real = label_positions._fused_at
    monkeypatch.setattr(label_positions, "_fused_at", lambda *a, **k: taken.append(1) or real(*a, **k))
    scored = []
    real_apply = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply",
                        lambda hidden, *a: scored.append(hidden.shape[0]) or real_apply(hidden, *a))
    host = next(iter(trainer.get_train_dataloader()))
    index = host[label_positions.KEY]
    assert index.tolist() == label_positions.positions(host["labels"]).tolist()
    assert 0 < index.numel() < host["labels"][:, 1:].numel()
    ours, our_grads = loss_and_grads(trainer, host)
    assert taken == [1] and scored == [index.numel()]  # our path, trl's kernel on the labelled rows only
    torch.testing.assert_close(ours, trl_loss, rtol=1e-5, atol=1e-6)
    assert our_grads.keys() == trl_grads.keys() and any("lora_A" in n for n in our_grads)
    for name, g in our_grads.items():
        torch.testing.assert_close(g, trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)

    # the per-token outputs the step's metrics read (entropy, top-1) sit where trl puts them
    model = trainer.model
    with torch.no_grad():
        inputs = {k: v for k, v in host.items() if k != label_positions.KEY}
        theirs = model(**inputs, fused_lm_head=True)
        mine = model(**host, fused_lm_head=True)
    for field in ("log_probs", "entropy", "is_top1", "label_mask"):
        torch.testing.assert_close(getattr(mine, field), getattr(theirs, field), rtol=1e-5, atol=1e-6, msg=field)
    # without the fused head (e.g. evaluation that wants logits) the key is dropped, the model's own forward runs
    with torch.no_grad():
        plain = model(**{k: v for k, v in host.items() if k != "labels"})
    assert plain.logits.shape[:2] == host["input_ids"].shape
