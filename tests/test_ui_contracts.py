"""The contracts between the UI's modules are declared: each tab's dataclass lists every component and handler
another module uses (slots: setting anything else fails at build time), and the app's Blocks carries only the
attributes `App` declares."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path

import gradio as gr
import pytest

from phi3_lora.ui import app as app_module

UI = Path(app_module.__file__).parent


def ui_dataclasses() -> list[type]:
    found = []
    for path in sorted(UI.glob("*.py")):
        module = importlib.import_module(f"phi3_lora.ui.{path.stem}")
        found += [c for _, c in inspect.getmembers(module, dataclasses.is_dataclass)
                  if inspect.isclass(c) and c.__module__ == module.__name__]
    return found


def test_every_ui_dataclass_refuses_undeclared_attributes():
    classes = ui_dataclasses()
    names = {c.__name__ for c in classes}
    assert {"DatasetTab", "SettingsTab", "TrainTab", "CompareTab", "ExportTab", "EvalPanel", "TimingBox", "Loader",
            "AppOptions", "AppState"} <= names
    assert [c.__name__ for c in classes if c.__dictoffset__ != 0] == []  # no instance __dict__: slots only
    from phi3_lora.ui.timing import TimingBox

    box = TimingBox(html=None, measure=None)
    with pytest.raises(AttributeError):
        box.on_change = print  # what a wire() once did to a tab without declaring it


def test_the_built_app_carries_only_declared_attributes(tmp_path):
    demo = app_module.build_app(tmp_path / "runs")
    with gr.Blocks() as plain:
        gr.Textbox()
    added = set(vars(demo)) - set(vars(plain))
    assert added == set(app_module.App.__annotations__)
    assert demo.phi3_options.runs_dir == (tmp_path / "runs").resolve() and demo.phi3_state.options is demo.phi3_options
