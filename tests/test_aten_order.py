"""aten_order: RMSNorm's mean and SiLU * up spelled in ATen's float32 CPU order, so that inductor's fused C++ gives
ATen's bits (Compare's compiled pair step, speed/pair_graph.py). A sum in any other order differs in the last
bits of most random rows, so equal results over many rows of several magnitudes are the check."""

from __future__ import annotations

import pytest

from phi3_lora.speed import aten_order


@pytest.mark.parametrize("n", [9, 17, 64, 100, 576, 960, 1536, 3072, 4096])
def test_inner_sum_is_atens_sum_bit_for_bit(n):
    import torch

    width = aten_order.lanes()
    if width is None:
        pytest.skip("inductor does not vectorise with ATen's width here")
    gen = torch.Generator().manual_seed(n)
    for trial in range(50):
        x = torch.randn(2, 1, n, generator=gen) * 10.0 ** (trial % 7 - 3)
        assert torch.equal(aten_order.inner_sum(x, width), x.sum(-1))
        squares = x * x
        assert torch.equal(aten_order.inner_sum(squares, width) / n, squares.mean(-1))


def test_another_order_is_caught():
    """The check has teeth: a plain left-to-right sum differs from ATen's on these rows."""
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 576, generator=gen)
    sequential = x[:, 0].clone()
    for k in range(1, 576):
        sequential = sequential + x[:, k]
    assert not torch.equal(sequential, x.sum(-1))


@pytest.mark.parametrize("hidden, intermediate", [(64, 128), (576, 1536)])  # the tiny Llama; the embedded SmolLM2
def test_compiled_rms_norm_and_silu_equal_aten(hidden, intermediate):
    """Compiled by inductor (as pair_graph compiles the step), both equal ATen's kernels on this machine."""
    from phi3_lora.speed import pair_step

    if aten_order.lanes() is None:
        pytest.skip("inductor does not vectorise with ATen's width here")
    aten_order.faithful.cache_clear()
    with pair_step.compiler_settings():
        assert aten_order.faithful(2, hidden, intermediate, 1e-5) == aten_order.lanes()
