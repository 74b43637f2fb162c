"""trl's loss head scores only the labelled positions on the CPU too.

trl's SFTTrainer computes the loss with a fused LM head (`trl.kernels.ChunkedLogProbFunction`: the logits in
vocabulary chunks, never all at once). On CUDA it passes only the positions whose label is not -100; elsewhere
it scores every position and zeroes the masked ones afterwards, because on compiled backends (Neuron) a batch's
count of labelled positions would change the tile shapes and recompile. On the CPU nothing recompiles, and with
assistant-only loss most positions are masked (the sample data: 844 labelled of 3,332 positions, padding
included), so the projection onto the 49k-token vocabulary and its fp32 softmax backward ran four times over.
Measured on the 2-core EPYC, embedded SmolLM2, quick-cpu batches: 9.0 s -> 5.1 s for three steps; the loss
and the gradients are the same (tests/test_compact_loss.py).

trl decides with the private helper `trl.trainer.utils._use_triton(device)`; `install` makes it answer yes for
the CPU in that module only (the chunk kernel keeps its own torch path). Our own patch because trl has no
switch for it; tested with the trl in `versions.TESTED`, the stock path otherwise.
"""

from __future__ import annotations

from typing import Any

from phi3_lora.speed import versions

_MARK = "_phi3_compact_cpu"
_ORIGINAL = "_phi3_original"


def install() -> bool:
    """Score only the labelled positions on the CPU (idempotent); False when trl is not the tested version."""
    if not versions.tested("compact_loss"):
        return False
    import trl.trainer.utils as trl_utils

    current = trl_utils._use_triton
    if getattr(current, _MARK, False):
        return True

    def compact_on_cpu(device: Any) -> bool:
        return current(device) or device.type == "cpu"

    setattr(compact_on_cpu, _MARK, True)
    setattr(compact_on_cpu, _ORIGINAL, current)
    trl_utils._use_triton = compact_on_cpu
    return True


def installed() -> bool:
    import trl.trainer.utils as trl_utils

    return bool(getattr(trl_utils._use_triton, _MARK, False))


def uninstall() -> None:
    """trl's own choice again (tests compare both paths in one process)."""
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils._use_triton, _ORIGINAL, None)
    if original is not None:
        trl_utils._use_triton = original
