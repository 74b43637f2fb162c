"""The Gradio app: the only package that imports gradio. One module per tab."""

from phi3_lora.ui.app import build_app, launch
from phi3_lora.ui.common import AppOptions

__all__ = ["AppOptions", "build_app", "launch"]
