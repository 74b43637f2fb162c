"""Correctness on the GPU, before the timed rows (skipped with `--no-check`): the packed path keeps sequences apart,
and DropoutLoraA gives the forward and gradients of the dropout + product it replaces."""

from __future__ import annotations

from pathlib import Path

from bench.timing import release_memory


def check_packed_gpu(model_dir: Path) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from phi3_lora.speed import packed_attention

    packed_attention.register()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": 0},
                                                 attn_implementation=packed_attention.NAME).eval()
    torch.manual_seed(1)
    lens = [700, 1300, 48]
    seqs = [torch.randint(100, 30000, (n,), device="cuda") for n in lens]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    pos = torch.cat([torch.arange(n, device="cuda") for n in lens])[None]
    with torch.no_grad():
        packed = model(input_ids=torch.cat(seqs)[None], position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                       max_length_q=max(lens), max_length_k=max(lens)).logits[0].float()
        alone = torch.cat([model(input_ids=s[None]).logits[0].float() for s in seqs])
    rel = float((packed - alone).norm() / alone.norm())
    del model
    release_memory()
    return {"packed_vs_alone_rel_err": rel, "max_abs": float((packed - alone).abs().max())}


def check_dropout_lora_gpu() -> dict[str, float]:
    """DropoutLoraA on CUDA in bf16 against nn.Dropout + the product it replaces, from the same RNG state:
    the forward must be equal and the gradients equal up to bf16 rounding of the dropout scale."""
    import torch

    from phi3_lora.speed.lean_lora import DropoutLoraA

    torch.manual_seed(0)
    x = torch.randn(4, 2048, 3072, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(16, 3072, device="cuda", dtype=torch.bfloat16) * 0.02
    g = torch.randn(4, 2048, 16, device="cuda", dtype=torch.bfloat16)
    out = {}
    for name, fn in (("lean", lambda a, b: DropoutLoraA.apply(a, b, 0.05, None)),
                     ("plain", lambda a, b: torch.nn.functional.dropout(a, 0.05) @ b.t())):
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        torch.manual_seed(7)
        h = fn(a, b)
        h.backward(g)
        out[name] = (h.detach(), a.grad, b.grad, torch.randn(3, device="cuda"))  # and the RNG stream after
    (h1, gx1, gw1, r1), (h2, gx2, gw2, r2) = out["lean"], out["plain"]
    rel = lambda u, v: float((u.float() - v.float()).norm() / v.float().norm())  # noqa: E731
    result = {"forward_equal": bool(torch.equal(h1, h2)), "grad_x_rel": rel(gx1, gx2), "grad_w_rel": rel(gw1, gw2),
              "rng_after_equal": bool(torch.equal(r1, r2))}
    try:  # the SwiGLU output remade from Liger's saved inputs: the same gradients, bit for bit
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        from phi3_lora.speed.lean_lora import remake_source
    except ImportError:
        return result
    gate_up = torch.randn(1, 8192, 2 * 8192, device="cuda", dtype=torch.bfloat16)
    wd = torch.randn(16, 8192, device="cuda", dtype=torch.bfloat16) * 0.02
    grads = {}
    for remake in (True, False):
        gu, b = gate_up.clone().requires_grad_(), wd.clone().requires_grad_()
        torch.manual_seed(7)
        c = LigerSiLUMulFunction.apply(*gu.chunk(2, dim=-1))
        source = remake_source(c) if remake else None
        if remake and source is None:
            return {**result, "remake": "not found"}
        DropoutLoraA.apply(c, b, 0.05, source).sum().backward()
        grads[remake] = (gu.grad, b.grad)
    result["remake_grads_equal"] = all(torch.equal(u, v) for u, v in zip(grads[True], grads[False]))
    return result
