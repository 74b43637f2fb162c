"""SDPA's kernels side by side on one GPU for the Phi-3-mini attention shape: forward + backward time per kernel.

    python -m bench.attn_kernels [--batch 4 --seq 2048 --heads 32 --dim 96]
    python -m bench.attn_kernels --mix   # packs of unequal lengths: flash varlen vs cuDNN's ragged attention

Prints, for each backend PyTorch offers (flash, cuDNN, memory-efficient), the median of 20 causal forward +
backward passes in bf16, TFLOP/s, and the largest difference of its output from flash's; a backend that refuses
the shape says why. Used to decide `options.CUDNN_ATTENTION` (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from typing import Any


def main(argv: list[str] | None = None) -> int:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--mix", action="store_true", help="packs of chat-length sequences (the bench's mix)")
    a = p.parse_args(argv)
    if a.mix:
        print(json.dumps(mix(a), indent=1))
        return 0
    torch.manual_seed(0)
    shape = (a.batch, a.seq, a.heads, a.dim)  # transformers' layout, transposed to (B, H, S, D) as Phi-3 does
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
               for _ in range(3))
    grad = torch.randn_like(q)
    flops = 4 * a.batch * a.heads * a.seq * a.seq * a.dim / 2 * 3.5  # causal; backward 2.5x the forward
    out: dict[str, object] = {"shape": [a.batch, a.heads, a.seq, a.dim], "torch": torch.__version__,
                              "cudnn": torch.backends.cudnn.version()}
    ref = None
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                times = []
                for i in range(a.repeats + 3):
                    for t in (q, k, v):
                        t.grad = None
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    o = sdpa(q, k, v, is_causal=True)
                    o.backward(grad)
                    end.record()
                    torch.cuda.synchronize()
                    if i >= 3:
                        times.append(start.elapsed_time(end))
            ms = statistics.median(times)
            diff = 0.0 if ref is None else float((o.detach().float() - ref).abs().max())
            ref = o.detach().float() if ref is None else ref
            out[backend.name] = {"ms_fwd_bwd": round(ms, 3), "tflops": round(flops / ms / 1e9, 1),
                                 "max_abs_diff_vs_flash": diff}
        except Exception as exc:  # noqa: BLE001 -- report the refusal, go on with the next backend
            out[backend.name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    print(json.dumps(out, indent=1))
    return 0


def mix_lengths(seed: int, rows: int = 4, row_len: int = 2048) -> list[int]:
    """Sequence lengths of one padding-free step of the bench's chat mix (bench/chat_mix.py), packed first-fit
    into `rows` rows of `row_len` tokens, as trl's packing does."""
    import random

    from bench.chat_mix import token_count

    rng = random.Random(seed)
    free, lengths = [row_len] * rows, []
    for _ in range(200):
        n = token_count(rng)
        fit = next((i for i, f in enumerate(free) if f >= n), None)
        if fit is None:
            if max(free) < 64:
                break
            continue
        free[fit] -= n
        lengths.append(n)
    return lengths


def _timed(fn: Any, grads: Any, repeats: int) -> float:
    import torch

    times = []
    for i in range(repeats + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        out.backward(grads)
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def cudnn_ragged_path(q: Any, k: Any, v: Any, cu: Any, slots: int | None = None) -> Any:
    """cuDNN's fused attention on the packed (T, H, D) tensors with ragged offsets, through cuDNN's frontend
    (speed/cudnn_ragged.py: options.CUDNN_RAGGED), `slots` sequences a graph (None: its SLOTS)."""
    from phi3_lora.speed import cudnn_ragged

    if cudnn_ragged.frontend() is None:
        raise RuntimeError("cuDNN's Python frontend is not installed here (nvidia-cudnn-frontend)")
    return lambda: cudnn_ragged.ragged_attention(q, k, v, cu, None, slots or cudnn_ragged.SLOTS)


def mix(a: argparse.Namespace) -> dict[str, Any]:
    """The engine's kernel for packs of unequal lengths (flash varlen) against full-length rows through cuDNN:
    forward + backward ms per layer over 4 steps' packs of the chat mix, and the largest difference of its output
    and q/k/v gradients from a per-sequence fp32 reference. A candidate kernel for the mix joins `paths`
    (docs/benchmarks.md lists those measured and not adopted: torch's ragged cuDNN call, dense buckets,
    FlexAttention, in git history at aec1f73)."""
    import torch

    from phi3_lora.speed import packed_attention as pa

    torch.manual_seed(0)
    h, d = a.heads, a.dim
    result: dict[str, Any] = {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "steps": []}
    try:
        import importlib.metadata as md

        result["cudnn_frontend"] = md.version("nvidia-cudnn-frontend")
    except Exception as exc:  # noqa: BLE001
        result["cudnn_frontend"] = f"{type(exc).__name__}: {exc}"
    for seed in range(4):
        lengths = mix_lengths(seed)
        total = sum(lengths)
        cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
        max_len = max(lengths)
        q, k, v = (torch.randn(total, h, d, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3))
        grad = torch.randn_like(q)
        ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
        ref = pa._per_sequence_sdpa(*(t.transpose(0, 1) for t in ref_in), cu.tolist(), None).transpose(0, 1)
        ref.backward(grad.float())
        paths = {"flash_varlen": lambda: pa._cuda_varlen(q, k, v, cu, max_len, None),
                 "cudnn_frontend_ragged": cudnn_ragged_path(q, k, v, cu),
                 "cudnn_frontend_ragged_exact_slots": cudnn_ragged_path(q, k, v, cu, slots=len(lengths))}
        step: dict[str, Any] = {"tokens": total, "sequences": len(lengths), "max_len": max_len,
                                "causal_pairs_share_of_full": round(sum(n * n for n in lengths) / (4 * 2048 ** 2), 3)}
        for name, fn in paths.items():
            try:
                for t in (q, k, v):
                    t.grad = None
                out = fn()
                out.backward(grad)
                diffs = {"out": float((out.detach().float() - ref.detach()).abs().max())}
                diffs.update({f"d{n}": float((t.grad.float() - r.grad).abs().max())
                              for n, t, r in zip("qkv", (q, k, v), ref_in)})
                step[name] = {"ms_fwd_bwd": round(_timed(fn, grad, a.repeats), 3),
                              "max_abs_diff_vs_fp32": {n: round(x, 4) for n, x in diffs.items()}}
            except Exception as exc:  # noqa: BLE001 -- report the refusal, go on with the next path
                step[name] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        result["steps"].append(step)
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qd, kd, vd = (torch.randn(4, h, 2048, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
                      for _ in range(3))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            result["full_rows_cudnn_ms"] = round(_timed(
                lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True),
                torch.randn_like(qd), a.repeats), 3)
    except Exception as exc:  # noqa: BLE001
        result["full_rows_cudnn_ms"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return result


if __name__ == "__main__":
    sys.exit(main())
