"""What Compare's compiled pair step computes (pair_graph.py compiles and serves it): the base weights and
LoRA tensors it reads (`weights`), the step as a module in LlamaForCausalLM's decode order (`step_module`), and
the compiler settings under which its sums stay ATen's (`compiler_settings`, `onednn_products`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import types
from dataclasses import dataclass, field
from typing import Any, Iterator

from phi3_lora.speed import aten_order, pair_ops

FUSE_SIBLINGS = True  # q/k/v and gate/up as one packed product each, as cpu_linear runs them (the same sums)
FUSED_NORMS = True  # RMSNorm and SiLU * up fused by inductor in ATen's order (aten_order) where that is exact here
CPP_WRAPPER = False  # the compiled step's wrapper in C++ instead of Python (inductor's cpp_wrapper)

_counter = itertools.count()


@contextlib.contextmanager
def compiler_settings() -> Iterator[None]:
    """Inductor's settings for the step, while it compiles (torch.compile's `options` do not reach freezing):
    weights frozen as constants, bf16 rounded after every op as eagerly, oneDNN's products."""
    import torch._inductor.config as inductor

    # no reassociation, no FMA contraction: aten_order's RMSNorm / SiLU keep ATen's order only so (the defaults)
    exact = {"cpp.enable_floating_point_contract_flag": "off", "cpp.enable_unsafe_math_opt_flag": False}
    with inductor.patch(freezing=True, emulate_precision_casts=True, cpp_wrapper=CPP_WRAPPER, **exact), \
            onednn_products():
        yield


@contextlib.contextmanager
def onednn_products() -> Iterator[None]:
    """Inductor's freezing pass packs each constant weight for oneDNN's inner product (`mkldnn._linear_pointwise`,
    packed for the step's 2 rows: the kernel and layout `cpu_linear` runs eagerly) for bf16, but for float32 with
    a static batch it takes MKL's packed GEMM, another kernel with other roundings. It takes oneDNN's where it
    believes oneDNN is built with ACL: that is what this says to the pass while the step compiles (the pass reads
    it only then, and nothing else in this process compiles for the CPU)."""
    from torch._inductor.fx_passes import mkldnn_fusion

    real = mkldnn_fusion.mkldnn

    class _OneDnn:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        @staticmethod
        def _is_mkldnn_acl_supported() -> bool:
            return True

    mkldnn_fusion.mkldnn = _OneDnn()
    try:
        yield
    finally:
        mkldnn_fusion.mkldnn = real


def llama_core(model: Any) -> Any:
    """The LlamaModel inside `model` (peft-wrapped or not), or None for any other architecture."""
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    inner = model
    for _ in range(3):
        if isinstance(inner, LlamaForCausalLM):
            return inner.model
        inner = getattr(inner, "base_model", None) or getattr(inner, "model", None)
        if inner is None:
            return None
        if hasattr(inner, "model") and isinstance(getattr(inner, "model"), LlamaForCausalLM):
            inner = inner.model
    return None


@dataclass
class Weights:
    """The tensors the step reads, taken once under the engine's lock (the eager path swaps module forwards and,
    for one-row tuned answers, base weights: the trace never reads a module)."""

    embed: Any
    head: Any
    rotary: Any  # the model's rotary embedding module, called eagerly each step (cos/sin as eager makes them)
    final_norm: Any
    eps: float
    layers: list[dict[str, Any]] = field(default_factory=list)
    lora: dict[tuple[int, str], Any] = field(default_factory=dict)  # merging.LoraPlan per adapted layer
    groups: int = 1
    scaling: float = 1.0
    heads: int = 1
    kv_heads: int = 1
    head_dim: int = 1
    hidden: int = 1
    intermediate: int = 1
    width: int | None = None  # aten_order's vector width where its RMSNorm / SiLU equal ATen's here (else opaque ops)


PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def weights(model: Any, routing: Any) -> Weights:
    core = llama_core(model)
    head = model.get_output_embeddings()
    head = getattr(head, "base_layer", head)
    config = core.config
    attn = core.layers[0].self_attn
    w = Weights(embed=core.embed_tokens.weight, head=head.weight, rotary=core.rotary_emb, final_norm=core.norm.weight,
                 eps=core.norm.variance_epsilon, groups=attn.num_key_value_groups, scaling=attn.scaling,
                 heads=config.num_attention_heads, kv_heads=config.num_key_value_heads, head_dim=attn.head_dim)
    w.hidden, w.intermediate = config.hidden_size, config.intermediate_size
    for i, layer in enumerate(core.layers):
        parts = {"in_norm": layer.input_layernorm.weight, "post_norm": layer.post_attention_layernorm.weight}
        for name in PROJ:
            parent = layer.self_attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp
            module = getattr(parent, name)
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            parts[name] = base.weight
            plan = routing.plan_of(module)
            if plan is not None:
                w.lora[(i, name)] = plan
        w.layers.append(parts)
    return w


def step_module(w: Weights) -> Any:
    """The pair step as a module called with (token ids [2, 1], cos, sin, key buffers, value buffers, mask buffer,
    state, LoRA tensors): the ops of LlamaForCausalLM's decode step for a base row 0 and a tuned row 1, in the same
    order. The base weights are its parameters (the model's own tensors, shared), so that freezing makes them
    constants and packs them; the LoRA tensors come in as inputs, so their products stay aten's `mm` as eagerly."""
    import torch
    import torch.nn.functional as F

    pair_ops.define()
    ops = torch.ops.phi3_lora
    lora_index = {key: 2 * n for n, key in enumerate(w.lora)}  # (layer, name) -> its a_t's place in the inputs

    def products(self: Any, x: Any, i: int, names: tuple[str, ...]) -> list[Any]:
        """The base products of layer i's `names` (siblings reading x): one product of their stacked weights, each
        taking its columns, as `cpu_linear` runs them eagerly (the same sums: each column is its own dot product).
        The stacking is constant-folded by freezing, then packed like any weight."""
        weights = [getattr(self, f"l{i}_{name}") for name in names]
        if len(weights) == 1 or not FUSE_SIBLINGS:
            return [F.linear(x, weight) for weight in weights]
        out, start, parts = F.linear(x, torch.cat(weights)), 0, []
        for weight in weights:
            parts.append(out[..., start:start + weight.shape[0]])
            start += weight.shape[0]
        return parts

    def lora(out: Any, x: Any, i: int, name: str, lora_in: list[Any]) -> Any:
        """`out` (layer i's `name` base product of x) with the tuned row's LoRA update, as RowRouting adds it."""
        plan = w.lora.get((i, name))
        if plan is None:
            return out
        a_t, b_t = lora_in[lora_index[(i, name)]], lora_in[lora_index[(i, name)] + 1]
        # RowRouting's form: the tuned row's down product (its sibling group's, then its columns), then the up one
        h = x[1:].to(a_t.dtype).reshape(-1, x.shape[-1]).mm(a_t)
        if plan.cols is not None:
            h = h[:, plan.cols[0]:plan.cols[1]]
        rest = out[1:]
        if out.dtype == b_t.dtype:  # one GEMM into the tuned row, scaled by the GEMM itself
            tuned = torch.addmm(rest.reshape(-1, rest.shape[-1]), h, b_t, alpha=plan.scaling)
        else:  # float32 adapter on a bf16 model: rounded once when added
            update = h.mm(b_t)
            if not plan.folded:
                update = update * plan.scaling
            tuned = rest.reshape(-1, rest.shape[-1]) + update.to(out.dtype)
        return torch.cat([out[:1], tuned.view(rest.shape)])

    def linear(self: Any, x: Any, i: int, names: tuple[str, ...], lora_in: list[Any]) -> list[Any]:
        return [lora(out, x, i, name, lora_in) for out, name in zip(products(self, x, i, names), names)]

    if w.width is not None:  # fused by inductor, in ATen's order
        rms_norm = functools.partial(aten_order.rms_norm, width=w.width)
        silu_mul = aten_order.silu_mul
    else:  # eagerly, inside opaque ops
        rms_norm, silu_mul = ops.rms_norm, ops.silu_mul

    def rotate_half(x: Any) -> Any:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def forward(self: Any, ids: Any, cos: Any, sin: Any, k_bufs: list[Any], v_bufs: list[Any], mask_buf: Any,
                state: Any, lora_in: list[Any]) -> Any:
        rows = ids.shape[0]
        h = F.embedding(ids, self.embed)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for i in range(len(w.layers)):
            x = rms_norm(h, getattr(self, f"l{i}_in_norm"), w.eps)
            q, k, v = (t.reshape(rows, 1, -1, w.head_dim).transpose(1, 2)
                       for t in linear(self, x, i, ("q_proj", "k_proj", "v_proj"), lora_in))
            q = (q * cos) + (rotate_half(q) * sin)
            k = (k * cos) + (rotate_half(k) * sin)
            a = ops.pair_attend(q, k, v, k_bufs[i], v_bufs[i], mask_buf, state, w.groups, w.scaling)
            h = h + linear(self, a.reshape(rows, 1, -1).contiguous(), i, ("o_proj",), lora_in)[0]
            x = rms_norm(h, getattr(self, f"l{i}_post_norm"), w.eps)
            gate, up = linear(self, x, i, ("gate_proj", "up_proj"), lora_in)
            h = h + linear(self, silu_mul(gate, up), i, ("down_proj",), lora_in)[0]
        h = rms_norm(h, self.final_norm, w.eps)
        return F.linear(h[:, -1, :], self.head).float()

    # A class and code object of its own: dynamo keeps compiled code on the code object, so this step's compiled
    # graph (and its frozen weights) go when the step does, not when a later adapter's step evicts them
    n = next(_counter)
    code = forward.__code__.replace(co_name=f"pair_step_{n}")
    fresh = types.FunctionType(code, forward.__globals__, code.co_name, forward.__defaults__, forward.__closure__)
    module = type(f"PairStep{n}", (torch.nn.Module,), {"forward": fresh})()
    for name, tensor in (("embed", w.embed), ("head", w.head), ("final_norm", w.final_norm)):
        module.register_parameter(name, tensor)
    for i, parts in enumerate(w.layers):
        for name, tensor in parts.items():
            module.register_parameter(f"l{i}_{name}", tensor)
    module.lora_inputs = [t for plan in w.lora.values() for t in (plan.a_t, plan.b_t)]
    return module
