"""SDPA's kernels side by side on one GPU for the Phi-3-mini attention shape: forward + backward time per kernel.

    python -m bench.attn_kernels [--batch 4 --seq 2048 --heads 32 --dim 96]

Prints, for each backend PyTorch offers (flash, cuDNN, memory-efficient), the median of 20 causal forward +
backward passes in bf16, TFLOP/s, and the largest difference of its output from flash's; a backend that refuses
the shape says why. Used to decide `options.CUDNN_ATTENTION` (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys


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
    a = p.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
