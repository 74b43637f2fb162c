"""The fast GPU path trains the same thing as the plain path (CPU checks).

1. Packed rows do not see each other: the logits of a padding-free packed row through the `sdpa_varlen`
   attention (its CPU branch: SDPA once per packed sequence; the CUDA branch is checked on the GPU by
   bench/train_speed.py, relative error 5e-3 in bf16) equal those of each sequence run alone.
2. Training with packing + sdpa_varlen gives the same loss curve as padded batches with plain SDPA,
   on a small real model, within a stated tolerance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.training import losses_of_run, varied_rows
from phi3_lora.speed import packed_attention

# Packed and padded steps hold the same rows; only the float order differs (trl averages over the trained
# tokens of a batch either way). Measured in float32 on the tiny Phi-3: max difference 2e-6 over 6 steps.
LOSS_TOLERANCE = 1e-4


def _model(folder: Path, attn: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    packed_attention.register()
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn, dtype=torch.float32).eval()


@pytest.mark.parametrize("lens", [[5, 11, 3, 7], [6, 6, 6]], ids=["varied", "equal (full-length rows)"])
@pytest.mark.parametrize("with_boundaries", [True, False])
def test_packed_sequences_do_not_attend_to_each_other(tiny_phi3_dir, with_boundaries, lens, monkeypatch):
    calls = []
    equal = packed_attention._equal_length_sdpa
    monkeypatch.setattr(packed_attention, "_equal_length_sdpa", lambda *a: calls.append(a[3]) or equal(*a))
    model = _model(tiny_phi3_dir, packed_attention.NAME)
    torch.manual_seed(0)
    seqs = [torch.randint(10, 30000, (n,)) for n in lens]
    kwargs = {"position_ids": torch.cat([torch.arange(n) for n in lens])[None]}
    if with_boundaries:  # as trl's padding-free collator passes them
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lens), max_length_k=max(lens))
    with torch.no_grad():
        packed = model(input_ids=torch.cat(seqs)[None], **kwargs).logits[0]
        alone = torch.cat([model(input_ids=s[None]).logits[0] for s in seqs])
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)
    # equal lengths take one batched SDPA call per layer (the dense kernels), varied ones the per-sequence path
    # (a sequence alone is one "packed" sequence of its own length: n = 1)
    batched = [n for n in calls if n > 1]
    assert batched == ([len(lens)] * model.config.num_hidden_layers if len(set(lens)) == 1 else [])


def test_a_packed_forward_never_asks_the_device_whether_its_row_is_packed(tiny_phi3_dir, monkeypatch):
    """transformers' mask preparation reads a tensor on the host to tell packed rows from one sequence (a wait for
    the GPU per forward); sdpa_varlen needs no mask there, so its forward reads no tensor value at all, and its
    logits stay those of each sequence alone. Padded batches still get their mask (the test below)."""
    lens = [5, 11, 3]
    model = _model(tiny_phi3_dir, packed_attention.NAME)
    torch.manual_seed(0)
    seqs = [torch.randint(10, 30000, (n,)) for n in lens]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    kwargs = {"position_ids": torch.cat([torch.arange(n) for n in lens])[None], "cu_seq_lens_q": cu,
              "cu_seq_lens_k": cu, "max_length_q": max(lens), "max_length_k": max(lens),
              "use_cache": False}  # as in training: no cache, so transformers probes the position ids
    with torch.no_grad():
        alone = torch.cat([model(input_ids=s[None]).logits[0] for s in seqs])
        reads: list[str] = []
        for name in ("__bool__", "item"):  # what `if tensor.all():` and `.item()` call
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _o=original, _n=name: reads.append(_n) or _o(t, *a))
        packed = model(input_ids=torch.cat(seqs)[None], **kwargs).logits[0]
        monkeypatch.undo()
    # on the CPU the varlen branch itself lists the boundaries once per layer (tolist, not patched): no other read
    assert reads == []
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)


def test_sdpa_varlen_equals_sdpa_on_padded_batches(tiny_phi3_dir):
    """Padded batches (and generation) take plain SDPA: same logits as attn_implementation='sdpa'."""
    ids = torch.randint(10, 30000, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        a = _model(tiny_phi3_dir, packed_attention.NAME)(input_ids=ids, attention_mask=mask).logits
        b = _model(tiny_phi3_dir, "sdpa")(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()])


@pytest.mark.slow
def test_packed_fast_path_trains_like_the_plain_path(tmp_path, tiny_phi3_dir):
    """A step holds all 24 rows either way (padded: 24 rows; packed: a few 512-token sequences), so each
    step sees the same tokens and the curves must agree step by step."""
    data = varied_rows(tmp_path / "d.jsonl")
    plain = losses_of_run(tiny_phi3_dir, data, tmp_path / "plain", attn="sdpa", packing=False)
    fast = losses_of_run(tiny_phi3_dir, data, tmp_path / "fast", attn="sdpa_varlen", packing=True)
    assert len(plain) == len(fast) == 6
    assert plain[-1] < plain[0]
    diffs = [abs(a - b) for a, b in zip(plain, fast)]
    assert max(diffs) < LOSS_TOLERANCE, (plain, fast)


def test_cudnn_is_put_first_only_on_a_gpu_it_was_measured_on():
    """On this CPU machine nothing changes SDPA's kernel order, and full-length packs keep the CPU path."""
    from phi3_lora.speed import sdpa_backend

    before = torch._C._get_sdp_priority_order()
    assert sdpa_backend.prefer_cudnn() is (torch.cuda.is_available() and sdpa_backend.cudnn_available())
    if not torch.cuda.is_available():
        assert not sdpa_backend.PREFERRED and torch._C._get_sdp_priority_order() == before
