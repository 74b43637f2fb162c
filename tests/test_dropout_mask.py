"""LoRA dropout in compiled layers: its mask op (phi3_lora/speed/dropout_mask.py) and the partitioner's saved
draws (phi3_lora/speed/seeded_recompute.py).

The op's CUDA kernel runs on a GPU only (`python -m bench.dropout_check` checks it there, with the same layer check
as here); on a CPU its CPU kernel takes the same place in the same compiled LoRA layer, so what is checked here is
the path around it: the op is in the graph the compiler sees, the keep rate is 1 - p, the backward uses the
forward's mask (also when the partitioner remakes the mask instead of keeping it), each call draws a new mask.
"""

from __future__ import annotations

import pytest
import torch

from bench import dropout_check
from phi3_lora import options
from phi3_lora.speed import dropout_mask


def test_threshold_is_p_to_32_bits():
    assert dropout_mask.threshold(0.0) == 0
    assert dropout_mask.threshold(0.05) == round(0.05 * 2**32)
    assert abs(dropout_mask.threshold(0.05) / 2**32 - 0.05) < 2**-32
    with pytest.raises(ValueError):
        dropout_mask.threshold(1.0)


def test_the_same_seed_gives_the_same_mask_and_the_rate_is_one_minus_p():
    stats = dropout_check.mask_stats("cpu", p=0.05, side=512)
    assert stats["same_seed_same_mask"] and stats["other_seed_differs"] and stats["other_key_differs"]
    assert abs(stats["keep_rate"] - 0.95) < 4 * stats["sigma"]
    assert abs(stats["neighbours_both_kept"] - stats["want_both"]) < 0.01


@pytest.mark.parametrize("kernel,budget", [(True, 0.1), (False, 0.1), (True, 1.0)],
                         ids=["mask op, partitioner keeps a tenth", "nn.Dropout, a tenth", "mask op, keeps all"])
def test_the_compiled_layer_backward_uses_the_forwards_mask(kernel, budget):
    """Through Inductor as `layers.compile_layers` sets it up. With a budget below 1 the partitioner may remake
    the mask in the backward pass; it must remake the same one (speed/seeded_recompute.py): without that pass the
    two budget-0.1 cases agree on only half the positions."""
    got = dropout_check.compiled_layer_masks("cpu", kernel, budget, p=0.5)
    assert got["op_in_graph"] == kernel
    assert got["kept_values_exact"] and abs(got["keep_rate"] - 0.5) < 4 * got["sigma"]
    assert got["backward_mask_agrees"] == 1.0, got
    assert got["grad_x_rel"] < 1e-2 and got["grad_a_rel"] < 1e-2, got
    assert got["new_mask_each_call"]


def test_eager_layers_and_cpu_runs_keep_their_dropout(monkeypatch):
    """Eager layers keep DropoutLoraA (it saves memory; the compiled path is where the draw costs), and the op is
    not taken on a CPU unless asked."""
    monkeypatch.setattr(options, "DROPOUT_MASK_KERNEL", True)
    x = torch.randn(2, 3, dropout_check.WIDTH)
    assert not dropout_mask.applies(x, 0.05)  # CPU, not asked
    monkeypatch.setattr(options, "DROPOUT_MASK_ON_CPU", True)
    assert dropout_mask.applies(x, 0.05) and not dropout_mask.applies(x, 0.0)
    calls: list[int] = []
    monkeypatch.setattr(dropout_mask, "dropout", lambda *a, **k: calls.append(1))
    model = dropout_check.identity_lora(0.5, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert calls == []


@pytest.mark.parametrize("kernel", [True, False], ids=["mask op", "nn.Dropout"])
def test_saving_the_draws_costs_the_budget_nothing(kernel):
    """The 8 GiB plan's share (0.08): a compiled layer keeps as much with the saved draws as without them (but for
    the seeds themselves, 32 bytes). Marking
    attention (tagged as seeded for its dropout) MUST_SAVE too kept one more hidden-size tensor per layer: on the
    H200 the 8 GiB plan then peaked at 8.07 GiB instead of 6.53 (issue 19, twelfth device session)."""
    without = dropout_check.saved_bytes_per_token(0.08, kernel, save_draws=False)
    with_draws = dropout_check.saved_bytes_per_token(0.08, kernel, save_draws=True)
    assert without <= with_draws < without + 1, (without, with_draws)  # the seeds: a few bytes a layer
