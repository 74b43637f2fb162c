"""What machine a bench's figures come from: the package versions and the GPU's (or CPU's) name, and the pinned host
<-> GPU copy rates."""

from __future__ import annotations

import platform
import time


GIB = 2**30


def host_link(gib: float = 1.0) -> dict[str, float]:
    """Pinned host <-> GPU copy rates (GB/s), which decide how many layers' activations host memory can take."""
    import torch

    n = int(gib * GIB)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    out = {}
    for label, dst, src in (("d2h_gb_s", host, dev), ("h2d_gb_s", dev, host)):
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        out[label] = 3 * n / (time.perf_counter() - t0) / 1e9
    del dev, host
    return out


def versions() -> dict[str, str]:
    import importlib.metadata as md

    import torch

    v = {"python": platform.python_version()}
    for p in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "liger-kernel"):
        try:
            v[p] = md.version(p)
        except md.PackageNotFoundError:
            v[p] = "-"
    v["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return v
