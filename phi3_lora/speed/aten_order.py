"""LlamaRMSNorm and SiLU * up written so that inductor's fused C++ gives ATen's float32 CPU results bit for bit.

Compare's compiled pair step (`pair_graph`) must give the eager step's logits exactly. Left to itself, inductor
sums RMSNorm's squares in its own order (one vector accumulator, then a horizontal sum) and writes SiLU as
x * sigmoid(x), so the fused step differed from eager in the last bits (docs/benchmarks.md); run eagerly inside
opaque ops instead, the 91 RMSNorm / SiLU calls of a step cost a Python round trip each. Here the same ops are
spelled out in the order ATen's CPU kernels compute them, as plain tensor ops that inductor fuses without
reordering: its C++ is built without reassociation or FMA contraction (-fno-unsafe-math-optimizations,
-ffp-contract=off, forced while the step compiles), division stays division and its vectorised `exp` is
ATen's own `Vectorized<float>::exp`.

- `mean(x * x, -1)`: ATen sums a contiguous float32 row with `vectorized_inner_sum` (aten/src/ATen/native/cpu/
  SumKernel.cpp): vectors of `lanes` floats, read 4 at a time into 4 accumulators (`row_sum`'s ilp_factor),
  those summed in a cascade of up to 4 levels of `level_step` vectors (`multi_row_sum`), the 4 accumulators added
  in order, the scalar tail first and then each lane in order into a scalar; then `sum / n` (mean on the CPU is
  sum then `div_`). `inner_sum` builds that expression tree from slices, every chunk of the first level at once.
- `silu(g) * up`: ATen's vectorised kernel is `g / (1 + exp(-g))`.

`faithful` checks the emulation against ATen eagerly on random rows of the step's shapes, and that inductor
vectorises with ATen's vector width; where either fails the step keeps the
opaque ops. Float32 only (bf16 goes through other kernels).
"""

from __future__ import annotations

import functools
from typing import Any

_ILP = 4  # row_sum's ilp_factor
_LEVELS = 4  # multi_row_sum's num_levels
_GRAIN = 32768  # at::internal::GRAIN_SIZE: smaller ops run in one thread, so one kernel call covers each row


def lanes() -> int | None:
    """Floats per `Vectorized<float>` in ATen's kernels on this CPU, when inductor's C++ vectorises with the same
    width (else None: the emulated order would not be ATen's)."""
    import torch

    width = {"AVX2": 256, "AVX512": 512}.get(torch.backends.cpu.get_cpu_capability())
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        isa = pick_vec_isa()
    except Exception:  # noqa: BLE001 - no C++ toolchain or an unknown CPU: no emulation
        return None
    if width is None or not isa or isa.bit_width() != width:
        return None
    return width // 32


def _add(a: Any, b: Any) -> Any:
    """a + b, where None is an accumulator still at 0 (0 + b == b exactly for the non-negative sums here; ATen's
    `acc += x` from 0 gives the same bits for any x but -0.0)."""
    return b if a is None else a if b is None else a + b


def _chunked_sum(body: Any, size: int) -> Any:
    """ATen's `multi_row_sum` of body [..., size, 4, lanes] over its size dim, the 4 x lanes accumulators as one
    tensor: [..., 4, lanes] (None for size 0). Its first level sums `step` vectors into an accumulator that starts
    at 0 each time, so every chunk of `step` is a plain left-to-right sum: all chunks are summed at once (step - 1
    adds of [..., chunks, 4, lanes] slices, whatever the width: a small graph), then combined in ATen's cascade."""
    power = max(4, max(size - 1, 0).bit_length() // _LEVELS)  # CeilLog2(size) / num_levels, at least 4
    step, mask = 1 << power, (1 << power) - 1
    full = size // step
    acc: list[Any] = [None] * _LEVELS
    if full:
        blocks = body[..., :full * step, :, :].reshape(*body.shape[:-3], full, step, *body.shape[-2:])
        chunks = blocks[..., 0, :, :]
        for j in range(1, step):
            chunks = chunks + blocks[..., j, :, :]
        for c in range(full):
            acc[0] = chunks[..., c, :, :]  # level 0 starts again at 0 after every chunk
            i = (c + 1) * step
            for j in range(1, _LEVELS):
                acc[j], acc[j - 1] = _add(acc[j], acc[j - 1]), None
                if i & (mask << (j * power)):
                    break
    for i in range(full * step, size):
        acc[0] = _add(acc[0], body[..., i, :, :])
    for j in range(1, _LEVELS):
        acc[0] = _add(acc[0], acc[j])
    return acc[0]


def inner_sum(x: Any, width: int) -> Any:
    """x [..., n] (float32) summed over its last dim as ATen's `vectorized_inner_sum` does, `width` lanes a vector:
    [...]."""
    n = x.shape[-1]
    vectors = n // width
    size = vectors // _ILP
    body = x[..., :size * _ILP * width].reshape(*x.shape[:-1], size, _ILP, width)
    summed = _chunked_sum(body, size) if size else None
    parts = [None if summed is None else summed[..., k, :] for k in range(_ILP)]
    for v in range(size * _ILP, vectors):
        parts[0] = _add(parts[0], x[..., v * width:(v + 1) * width])
    for k in range(1, _ILP):
        parts[0] = _add(parts[0], parts[k])
    total = None
    for k in range(vectors * width, n):
        total = _add(total, x[..., k])
    if parts[0] is not None:
        for lane in range(width):
            total = _add(total, parts[0][..., lane])
    return total


def rms_norm(x: Any, weight: Any, eps: float, width: int) -> Any:
    """LlamaRMSNorm.forward (float32): weight * (x * rsqrt(mean(x^2) + eps)), the mean summed in ATen's order."""
    import torch

    h = x.to(torch.float32)
    variance = inner_sum(h * h, width).unsqueeze(-1) / float(h.shape[-1])
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(x.dtype)


def silu_mul(gate: Any, up: Any) -> Any:
    """silu(gate) * up as ATen's vectorised float32 SiLU computes it."""
    import torch

    return gate / (1 + torch.exp(-gate)) * up


def _eager_rms_norm(x: Any, weight: Any, eps: float) -> Any:
    import torch

    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(x.dtype)


@functools.lru_cache(maxsize=8)
def faithful(rows: int, hidden: int, intermediate: int, eps: float, trials: int = 64) -> int | None:
    """The vector width (lanes) with which `rms_norm` and `silu_mul`, compiled by inductor in the caller's compiler
    settings, equal ATen's float32 kernels for [rows, 1, hidden] and [rows, 1, intermediate] on this machine, or
    None. Checked on random rows of several magnitudes (another order shows in the last bits of most rows); the
    emulated sum eagerly too. Compiles two small graphs (seconds). Ops this small run in one thread (below ATen's
    grain size), so the thread count does not enter. The exp inside SiLU cannot be checked eagerly: torch.exp
    takes MKL's vsExp, SiLU and inductor the vectorised Sleef exp."""
    import torch
    import torch.nn.functional as F

    width = lanes()
    if width is None or rows * max(hidden, intermediate) >= _GRAIN or (rows * intermediate) % (2 * width):
        return None  # split among threads, or a scalar tail in ATen's SiLU loop (2 vectors a step)

    def both(x: Any, weight: Any, gate: Any, up: Any) -> tuple[Any, Any]:
        return rms_norm(x, weight, eps, width), silu_mul(gate, up)

    compiled = torch.compile(both, dynamic=False, fullgraph=True)
    gen = torch.Generator().manual_seed(hidden)
    with torch.inference_mode():
        weight = torch.randn(hidden, generator=gen)
        for trial in range(trials):
            scale = 10.0 ** (trial % 7 - 3)
            x = torch.randn(rows, 1, hidden, generator=gen) * scale
            gate = torch.randn(rows, 1, intermediate, generator=gen) * scale
            up = torch.randn(rows, 1, intermediate, generator=gen)
            norm = _eager_rms_norm(x, weight, eps)
            fused_norm, fused_silu = compiled(x, weight, gate, up)
            if not (torch.equal(rms_norm(x, weight, eps, width), norm) and torch.equal(fused_norm, norm)
                    and torch.equal(fused_silu, F.silu(gate) * up)):
                return None
    return width
