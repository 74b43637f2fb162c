"""The eager-only pieces of Compare's compiled pair step (speed/pair_graph.py) as ops of their own: inductor calls them
and does not look inside, so they keep eager's bits (attention over exactly the filled length; RMSNorm and
SiLU * up where aten_order's fused forms are not exact)."""

from __future__ import annotations

import types

_defined = False
_library: object = None


def define() -> None:
    """The eager-only pieces of the step as ops of the `phi3_lora` namespace: inductor calls them, it does not look
    inside.

    Defined with a plain `torch.library.Library` and a CPU kernel, not `torch.library.custom_op`: the package calls
    the attention op 30 times a step (once per layer of the embedded model) through the dispatcher, and custom_op's
    Python autograd and in-place wrappers around each call cost more than the attention itself there (2 rows, 150
    positions, 2-core EPYC, inference mode: 155 against 99 us a call, the body itself 94 us; ~6% of a pair step,
    docs/benchmarks.md). Decoding never needs gradients, so the ops have no autograd kernel."""
    global _defined, _library
    if _defined:
        return
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    library = torch.library.Library("phi3_lora", "FRAGMENT")
    library.define("pair_attend(Tensor q, Tensor k, Tensor v, Tensor(a!) k_buf, Tensor(b!) v_buf, Tensor mask_buf, "
                   "Tensor state, int groups, float scaling) -> Tensor")
    library.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
    library.define("silu_mul(Tensor gate, Tensor up) -> Tensor")

    def pair_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                    mask_buf: torch.Tensor, state: torch.Tensor, groups: int, scaling: float) -> torch.Tensor:
        """Write this step's key/value at `state[0]`, then transformers' SDPA over the filled positions, with the
        2-D padding mask as a 4-D one where `state[1]` says there is padding (else none: what eager passes)."""
        pos, padded = state.tolist()
        k_buf[:, :, pos] = k[:, :, 0]
        v_buf[:, :, pos] = v[:, :, 0]
        filled = pos + 1
        mask = mask_buf[:, None, None, :filled] if padded else None
        module = types.SimpleNamespace(num_key_value_groups=groups, is_causal=True)
        out, _ = sdpa_attention_forward(module, q, k_buf[:, :, :filled], v_buf[:, :, :filled], mask, dropout=0.0,
                                        scaling=scaling)
        return out

    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """LlamaRMSNorm.forward's ops, eagerly."""
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + eps)
        return weight * h.to(x.dtype)

    def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(gate) * up

    for name, kernel in (("pair_attend", pair_attend), ("rms_norm", rms_norm), ("silu_mul", silu_mul)):
        library.impl(name, kernel, "CPU")

    @torch.library.register_fake("phi3_lora::pair_attend", lib=library)
    def _(q, k, v, k_buf, v_buf, mask_buf, state, groups, scaling):
        return q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])

    @torch.library.register_fake("phi3_lora::rms_norm", lib=library)
    def _(x, weight, eps):
        return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))

    @torch.library.register_fake("phi3_lora::silu_mul", lib=library)
    def _(gate, up):
        return gate.new_empty(gate.shape)

    _library = library  # the ops live as long as their library object
    _defined = True
