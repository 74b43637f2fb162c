"""phi3_lora: fine-tune a chat model with LoRA / QLoRA on your own chat data."""

__version__ = "0.1.0"
