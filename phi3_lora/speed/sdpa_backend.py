"""Which fused attention kernel PyTorch's SDPA picks for training on a GPU: cuDNN's first, where measured faster.

PyTorch orders SDPA's CUDA kernels flash, memory-efficient, math, cuDNN (`torch._C._get_sdp_priority_order`), so a
Phi-3 step runs its own FlashAttention-2 build, which on an H200 reaches about 270 TFLOP/s forward and 210 backward
for head dim 96 (docs/benchmarks.md). cuDNN's fused attention (cuDNN 9, Hopper kernels) is a drop-in for the same
causal call; `prefer_cudnn` moves it to the front of the order for this process, so every SDPA call (eager, or
traced by torch.compile, which reads the order when it traces) takes it where its constraints hold and falls back
to the next kernel where they do not. A private torch function, hence behind `versions`.
"""

from __future__ import annotations

import torch

from phi3_lora.speed import versions

# The GPUs the cuDNN kernel was measured faster on (compute capability): Hopper (H100, H200).
MEASURED_CAPABILITY = (9, 0)
# Set by `prefer_cudnn` in this process: packed_attention then sends full-length packed rows to dense SDPA (a plain
# module flag, so torch.compile reads it as a constant).
PREFERRED = False


def cudnn_available() -> bool:
    """A CUDA GPU of a measured generation, a torch with cuDNN attention and tested versions."""
    if not (torch.cuda.is_available() and versions.tested("cudnn_attention")):
        return False
    if not hasattr(torch._C, "_set_sdp_priority_order") or not torch.backends.cudnn.is_available():
        return False
    return torch.cuda.get_device_capability() >= MEASURED_CAPABILITY


def prefer_cudnn() -> bool:
    """Put cuDNN attention first in SDPA's kernel order for this process; False (nothing changed) where it is not
    available."""
    if not cudnn_available():
        return False
    from torch.nn.attention import SDPBackend

    first = int(SDPBackend.CUDNN_ATTENTION)
    torch.backends.cuda.enable_cudnn_sdp(True)
    order = [int(b) for b in torch._C._get_sdp_priority_order()]
    torch._C._set_sdp_priority_order([first] + [b for b in order if b != first])
    global PREFERRED
    PREFERRED = True
    return True
