"""speed/cudnn_ragged.py on the CPU: the packed sequences' lengths and ragged offsets it hands cuDNN, the custom
ops' shapes and autograd wiring as torch.compile sees them (fake tensors), and that the packed attention keeps
its CPU path with the switch on. The kernel itself needs cuDNN on a GPU: `python -m bench.attn_kernels --mix`
checks it against an fp32 reference there."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from phi3_lora import options
from phi3_lora.speed import cudnn_ragged


def test_lengths_and_offsets_come_from_cu_seqlens_with_empty_slots_after():
    seq, ragged = cudnn_ragged.device_meta(torch.tensor([0, 3, 10, 12]), heads=2, dim=4, slots=5)
    assert seq.shape == (5, 1, 1, 1) and ragged.shape == (6, 1, 1, 1)
    assert seq.flatten().tolist() == [3, 7, 2, 0, 0]
    assert ragged.flatten().tolist() == [0, 24, 80, 96, 96, 96]  # token offsets x heads x dim, in elements
    assert seq.dtype == ragged.dtype == torch.int32
    full_seq, _ = cudnn_ragged.device_meta(torch.tensor([0, 5, 9], dtype=torch.int32), heads=1, dim=1, slots=2)
    assert full_seq.flatten().tolist() == [5, 4]


def test_custom_ops_shapes_and_gradients_under_fake_tensors():
    with FakeTensorMode():
        q, k, v = (torch.empty(100, 4, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        cu = torch.empty(3, dtype=torch.int32)
        out = cudnn_ragged.ragged_attention(q, k, v, cu, None)
        assert out.shape == q.shape and out.dtype == torch.bfloat16
        _, stats = torch.ops.phi3_lora.cudnn_ragged_attention(q, k, v, cu, 0.25, 8)
        assert stats.shape == (8, 4, cudnn_ragged.S_MAX, 1) and stats.dtype == torch.float32
        out.sum().backward()
        assert all(t.grad is not None and t.grad.shape == t.shape for t in (q, k, v))


def test_not_usable_off_a_gpu_and_the_packed_path_keeps_its_cpu_kernel(monkeypatch):
    from phi3_lora.speed import packed_attention

    q = torch.randn(12, 2, 8, dtype=torch.bfloat16)
    assert not cudnn_ragged.usable(q, q, 3, 7)
    monkeypatch.setattr(options, "CUDNN_RAGGED", True)
    query, key, value = (torch.randn(1, 2, 12, 8) for _ in range(3))
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 0, 1]])
    out, _ = packed_attention.varlen_attention_forward(torch.nn.Module(), query, key, value, None,
                                                       position_ids=pos)
    ref = packed_attention._per_sequence_sdpa(query[0], key[0], value[0], [0, 3, 10, 12], None).transpose(0, 1)
    torch.testing.assert_close(out[0], ref)
