"""phi3_lora: fine-tune a chat model with LoRA / QLoRA on your own chat data."""

import logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend fetches an optional Hub kernel when imported (peft imports it even with 4-bit off) and
# warns "Failed to load CPU gemm_4bit_forward from kernels-community" when it cannot; its own fallback runs instead.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# The LoRA guide's API (phi3_lora.guide), imported on first use so `import phi3_lora` stays free of torch.
_GUIDE_API = ("finetune", "load_base", "add_lora", "lora_state_dict", "save_lora_state_dict", "load_lora")
__all__ = ["__version__", *_GUIDE_API]


def __getattr__(name: str):
    if name in _GUIDE_API:
        from phi3_lora import guide

        return getattr(guide, name)
    raise AttributeError(f"module 'phi3_lora' has no attribute {name!r}")
