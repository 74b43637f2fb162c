"""Checks of LoRA dropout in compiled layers (phi3_lora/speed/dropout_mask.py, seeded_recompute.py), on any device.

`python -m bench.dropout_check` on a GPU prints one JSON line: the mask op's keep rate and independence, a compiled
LoRA layer's forward and backward masks compared (kernel on and off, the partitioner keeping a tenth or all), and
the time of a dropout of one 8,192 x 8,192 input, Inductor's own against the op's. tests/test_dropout_mask.py runs
the same layer check on a CPU.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from phi3_lora import options
from phi3_lora.speed import dropout_mask, lean_lora, seeded_recompute

WIDTH = 16


class _Identity(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(WIDTH, WIDTH, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def identity_lora(p: float, device: str) -> nn.Module:
    """One adapted Linear whose base is 0 and whose LoRA factors are identities, lean forward installed: its
    output is dropout(x) (scaling 1), so the output shows the mask the forward drew (nonzero where kept)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_Identity(), LoraConfig(r=WIDTH, lora_alpha=WIDTH, lora_dropout=p,
                                                    target_modules=["proj"]))
    lora = model.base_model.model.proj
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(torch.eye(WIDTH))
        lora.lora_B["default"].weight.copy_(torch.eye(WIDTH))
    if lean_lora.install(model) != 1:
        raise RuntimeError("lean_lora did not install (untested library versions)")
    return model.to(device).train()


@contextlib.contextmanager
def compiled_setup(kernel: bool, budget: float, save_draws: bool = True) -> Iterator[None]:
    """Options and compiler config as `layers.compile_layers` sets them (`save_draws`: its saved-draws pass),
    restored afterwards."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    saved = options.DROPOUT_MASK_KERNEL, options.DROPOUT_MASK_ON_CPU
    options.DROPOUT_MASK_KERNEL, options.DROPOUT_MASK_ON_CPU = kernel, True
    try:
        with functorch_config.patch(activation_memory_budget=budget), \
                inductor_config.patch(joint_custom_post_pass=None):
            if save_draws:
                seeded_recompute.install()
            torch._dynamo.reset()
            yield
    finally:
        options.DROPOUT_MASK_KERNEL, options.DROPOUT_MASK_ON_CPU = saved
        torch._dynamo.reset()


def _step(fn: Any, model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    x = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        out = fn(x)
    (out.float() * g).sum().backward()
    a = model.base_model.model.proj.lora_A["default"].weight
    grads = x.grad.clone(), a.grad.clone()
    model.zero_grad()
    return out.detach().float(), *grads


def compiled_layer_masks(device: str, kernel: bool, budget: float, p: float = 0.5,
                         tokens: int = 256) -> dict[str, Any]:
    """A compiled identity LoRA layer's forward mask against the one its backward used, and the gradients
    against those nn.Dropout's backward gives with the forward's mask."""
    with compiled_setup(kernel, budget):
        model = identity_lora(p, device)
        graphs: list[torch.fx.GraphModule] = []

        def recording(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
            graphs.append(gm)
            return torch._dynamo.backends.registry.lookup_backend("inductor")(gm, example_inputs)

        lora = model.base_model.model.proj  # compiled on its own, as compile_layers compiles decoder layers
        dropout_mask.install(model, [lora])  # only where the op is taken (kernel on)
        lora.compile(backend=recording, dynamic=False)
        compiled = model
        torch.manual_seed(0)
        x = torch.randn(4, tokens, WIDTH).to(torch.bfloat16).float()  # exact in bf16: out is 2x or 0 exactly
        x[x == 0] = 1.0
        x, g = x.to(device), torch.randn(4, tokens, WIDTH).to(device)
        out, grad_x, grad_a = _step(compiled, model, x, g)
        out2, _, _ = _step(compiled, model, x, g)
    kept = out != 0
    g16 = g.to(torch.bfloat16).float()
    want_a = g16.reshape(-1, WIDTH).t() @ (x * kept / (1 - p)).reshape(-1, WIDTH)
    rel = lambda u, v: float((u - v).norm() / v.norm())  # noqa: E731
    return {
        "op_in_graph": any("phi3_lora.dropout_keep_mask" in str(n.target) for gm in graphs for n in gm.graph.nodes),
        "keep_rate": float(kept.float().mean()), "sigma": (p * (1 - p) / kept.numel()) ** 0.5,
        "kept_values_exact": bool(torch.equal(out[kept], (x / (1 - p))[kept])),
        "backward_mask_agrees": float((grad_x != 0).eq(kept).float().mean()),
        "grad_x_rel": rel(grad_x, g16 * kept / (1 - p)), "grad_a_rel": rel(grad_a, want_a),
        "new_mask_each_call": not bool(torch.equal(out2 != 0, kept)),
    }


def saved_bytes_per_token(budget: float, kernel: bool, save_draws: bool, tokens: int = 512) -> float:
    """Bytes a compiled tiny Phi-3 decoder layer (LoRA r16 all-linear, dropout 0.05) keeps for its backward pass
    per token, with the partitioner keeping `budget` of its activations: what the memory budget's plans pay."""
    from peft import LoraConfig, get_peft_model
    from transformers import Phi3Config, Phi3ForCausalLM

    sizes: list[int] = []
    with compiled_setup(kernel, budget, save_draws):
        torch.manual_seed(0)
        config = Phi3Config(hidden_size=256, intermediate_size=640, num_hidden_layers=1, num_attention_heads=8,
                            num_key_value_heads=8, vocab_size=512, max_position_embeddings=1024, pad_token_id=0)
        model = get_peft_model(Phi3ForCausalLM(config).to(torch.bfloat16),
                               LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
        lean_lora.install(model)
        model.train()
        dropout_mask.install(model, [m for m in model.modules() if isinstance(m, lean_lora.lora_linear_classes())])
        layer = model.base_model.model.model.layers[0]
        layer.compile()
        x = torch.randn(1, tokens, 256, dtype=torch.bfloat16, requires_grad=True)
        positions = torch.arange(tokens)[None]
        rope = model.base_model.model.model.rotary_emb(x, positions)
        for hook in model._forward_pre_hooks.values():  # the model's forward would run it: a new seed
            hook(model, ())

        def pack(t: torch.Tensor) -> torch.Tensor:
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autocast(x.device.type, dtype=torch.bfloat16), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = layer(x, position_embeddings=rope, attention_mask=None, position_ids=positions)
        (out[0] if isinstance(out, tuple) else out).float().sum().backward()
    return sum(sizes) / tokens


def mask_stats(device: str, p: float = 0.05, side: int = 8192) -> dict[str, Any]:
    """The op's mask alone: keep rate per quarter of the output (each quarter is one of Philox's four outputs),
    neighbours' joint keep rate against (1 - p)^2, and determinism by seed."""
    seed, key = torch.tensor([1234], device=device), torch.tensor([99], device=device)
    mask = dropout_mask.keep_mask(seed, key, [side, side], p)
    flat = mask.reshape(-1).float()
    quarters = [float(q.mean()) for q in flat.chunk(4)]
    pairs = float((flat[:-1] * flat[1:]).mean())
    strided = float((flat[: flat.numel() // 4] * flat[flat.numel() // 4: flat.numel() // 2]).mean())
    return {"p": p, "keep_rate": float(flat.mean()), "want": 1 - p, "sigma": (p * (1 - p) / flat.numel()) ** 0.5,
            "quarters": quarters, "neighbours_both_kept": pairs, "same_call_both_kept": strided,
            "want_both": (1 - p) ** 2,
            "same_seed_same_mask": bool(torch.equal(mask, dropout_mask.keep_mask(seed.clone(), key, [side, side], p))),
            "other_seed_differs": not bool(torch.equal(mask, dropout_mask.keep_mask(seed + 1, key, [side, side], p))),
            "other_key_differs": not bool(torch.equal(mask, dropout_mask.keep_mask(seed, key + 1, [side, side], p)))}


def time_dropouts(device: str = "cuda", side: int = 8192, p: float = 0.05, repeats: int = 20) -> dict[str, float]:
    """ms for `x * mask / (1 - p)` of a side x side bf16 input with its mask written (what a compiled layer
    keeps), compiled: Inductor's own dropout against the op's mask."""
    x = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    seed, key = torch.tensor([5], device=device), torch.tensor([7], device=device)

    def inductor_dropout(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.aten.native_dropout(t, p, True)

    def op_dropout(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = dropout_mask.keep_mask(seed, key, list(t.shape), p)
        return t * mask * (1.0 / (1.0 - p)), mask

    out: dict[str, float] = {}
    for name, fn in (("inductor_ms", inductor_dropout), ("op_ms", op_dropout)):
        compiled = torch.compile(fn)
        for _ in range(3):
            compiled(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            compiled(x)
        torch.cuda.synchronize()
        out[name] = (time.perf_counter() - start) / repeats * 1e3
    return out


def check_gpu() -> dict[str, Any]:
    result: dict[str, Any] = {"mask": mask_stats("cuda")}
    for kernel, budget in ((True, 0.1), (False, 0.1), (True, 1.0), (False, 1.0)):
        result[f"layer kernel={kernel} budget={budget}"] = compiled_layer_masks("cuda", kernel, budget, tokens=2048)
    result["timing"] = time_dropouts()
    return result


if __name__ == "__main__":
    print(json.dumps(check_gpu(), default=str))
