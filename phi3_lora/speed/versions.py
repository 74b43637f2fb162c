"""Version guards for the speed path: the parts that lean on other libraries' private APIs.

`lean_lora` replaces peft's LoRA forward per instance and reads `torch._C._autograd`; its SwiGLU remake
calls Liger's kernel internals; `packed_attention` registers with transformers' attention interfaces and
calls PyTorch's varlen kernel; `bnb_codes` cuts 4-bit weights through bitsandbytes' QuantState and a private
bitsandbytes function. Each was tested with the versions below (requirements.txt pins, and the H200
bench's, docs/benchmarks.md). With any other installed version the feature falls back to the stock path
(peft's forward, SDPA without packing, re-quantised slices), and one warning per process says which and why.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

# distribution -> the versions the speed path was tested with, each declared once: requirements.txt's pins and
# the H200 bench's (docs/benchmarks.md: torch 2.11, transformers 5.17). torch is compared on its public version
# (2.13.0+cu128 is 2.13.0), so the CPU and CUDA builds of one release are the same release.
TESTED: dict[str, str] = {
    "torch": ">=2.11,<2.14",
    "transformers": ">=5.17,<5.24",
    "peft": "==0.21.*",
    "bitsandbytes": "==0.50.*",
    "liger-kernel": "==0.8.*",
    "trl": "==1.16.*",
    "gguf": "==0.19.*",
}
# feature -> the distributions whose private APIs or internals it uses
NEEDS: dict[str, tuple[str, ...]] = {
    "lean_lora": ("torch", "peft"),
    "liger_remake": ("liger-kernel",),
    "sdpa_varlen": ("torch", "transformers"),
    "fused_4bit_codes": ("bitsandbytes",),
    "compact_loss": ("trl",),
    "cudnn_attention": ("torch",),
    "compile_layers": ("torch",),
    "deferred_metrics": ("transformers", "trl"),
    "label_positions": ("trl",),
    "gguf_parsed_once": ("transformers", "gguf"),
}
STOCK_PATH = {
    "lean_lora": "peft's own LoRA forward",
    "liger_remake": "the LoRA input kept instead of remade",
    "sdpa_varlen": "SDPA without packed rows",
    "fused_4bit_codes": "4-bit slices re-quantised instead of cut",
    "compact_loss": "every position scored by the loss head on the CPU",
    "cudnn_attention": "SDPA's own kernel order (FlashAttention-2 first)",
    "compile_layers": "eager decoder layers",
    "deferred_metrics": "step metrics read from the GPU in every step",
    "label_positions": "trl's fused loss head picks the labelled positions on the GPU (two waits per step)",
    "gguf_parsed_once": "a GGUF parsed three times while transformers loads it",
}


def installed(dist: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _fits(dist: str, spec: str) -> bool:
    found = installed(dist)
    if found is None:  # not installed: the feature's own availability check decides
        return True
    try:
        return Version(Version(found).public) in SpecifierSet(spec)  # 2.13.0+cpu is 2.13.0
    except InvalidVersion:
        return False


@lru_cache(maxsize=1)
def untested() -> dict[str, list[str]]:
    """feature -> the 'dist installed (tested spec)' entries that do not match; warns once when any does not."""
    found = {feature: [f"{d} {installed(d)} (tested {TESTED[d]})" for d in deps if not _fits(d, TESTED[d])]
             for feature, deps in NEEDS.items()}
    found = {f: why for f, why in found.items() if why}
    if found:
        parts = "; ".join(f"{STOCK_PATH[f]} ({', '.join(why)})" for f, why in found.items())
        warnings.warn(f"phi3_lora's speed path was not tested with the installed versions, so it uses the stock "
                      f"path: {parts}. Install the versions in requirements.txt for the faster path.",
                      RuntimeWarning, stacklevel=2)
    return found


def tested(feature: str) -> bool:
    """The installed libraries are ones `feature` was tested with (else: use the stock path)."""
    return feature not in untested()
