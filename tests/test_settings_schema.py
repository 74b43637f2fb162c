"""RunConfig is the schema of the Settings tab: every field has a widget there (or, for the data source, format,
mapping and eval split, in the Dataset tab), generated from the field's metadata, and each widget's range is the
range the config's own check enforces. Walked through the real app's Blocks and through the running server."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import gradio as gr
import pytest

from phi3_lora import config as cfgmod
from phi3_lora.config.fields import setting as setting
from phi3_lora.errors import UserError
from phi3_lora.ui import build_app, launch
from phi3_lora.ui.settings import DATASET_TAB, config_from_values, elem_id, values_from_config

FIELDS = [(s, f) for s, cls in cfgmod.SECTIONS.items() for f in dataclasses.fields(cls)]


def _descendants(block: gr.blocks.BlockContext) -> list[gr.blocks.Block]:
    out = []
    for child in getattr(block, "children", []):
        out.append(child)
        out += _descendants(child)
    return out


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, tiny_phi3_dir: Path) -> gr.Blocks:
    return build_app(tmp_path_factory.mktemp("runs"), default_model=str(tiny_phi3_dir))


def _tab(app: gr.Blocks, tab_id: str) -> dict[str, gr.blocks.Block]:
    tab = next(b for b in app.blocks.values() if isinstance(b, gr.Tab) and b.id == tab_id)
    found = {}
    for b in _descendants(tab):  # by elem_id, or by class where the page's script needs its own elem_id
        for key in [getattr(b, "elem_id", None), *(getattr(b, "elem_classes", None) or [])]:
            if key:
                found[key] = b
    return found


def test_every_field_has_a_widget_in_the_settings_tab(app: gr.Blocks) -> None:
    settings, dataset = _tab(app, "settings"), _tab(app, "dataset")
    missing = [f"{s}.{f.name}" for s, f in FIELDS
               if elem_id(s, f.name) not in (dataset if f.metadata.get("tab") == DATASET_TAB else settings)]
    assert not missing, missing
    assert len(FIELDS) >= 48 and all(elem_id(s, f.name) in settings for s, f in FIELDS
                                     if f.metadata.get("tab") != DATASET_TAB)
    for name in ("memory_budget_gb", "num_processes", "packing"):  # the knobs the old tab could not set
        assert elem_id("train", name) in settings
    for name in ("on_invalid", "hub_split", "max_rows"):
        assert elem_id("data", name) in settings
    accordion = next(b for b in _descendants(next(b for b in app.blocks.values() if isinstance(b, gr.Tab)
                                                  and b.id == "settings")) if isinstance(b, gr.Accordion))
    folded = {b.elem_id for b in _descendants(accordion) if getattr(b, "elem_id", None)}
    assert folded == {elem_id(s, f.name) for s, f in FIELDS if f.metadata.get("advanced")}


def test_widget_ranges_are_the_check_ranges(app: gr.Blocks) -> None:
    widgets = {**_tab(app, "settings"), **_tab(app, "dataset")}
    checked = 0
    for section, f in FIELDS:
        low, high = cfgmod.field_bounds(cfgmod.SECTIONS[section], f.name)
        w = widgets[elem_id(section, f.name)]
        if not hasattr(w, "minimum"):
            continue
        tp = typing.get_type_hints(cfgmod.SECTIONS[section])[f.name]
        # an optional Number has no widget bounds: the browser sends an emptied box as 0, which a minimum would
        # refuse before the handler can read it as "empty"; RunConfig's check below still holds the range
        optional = type(None) in typing.get_args(tp)
        assert (w.minimum, w.maximum) == ((None, None) if optional else (low, high)), (section, f.name)
        checked += low is not None or high is not None
        # the config's check enforces exactly these numbers: the bound itself passes unless it is a float's
        # exclusive bound (a whole number's is the next whole number inside), and one step past it fails
        whole = int in (typing.get_args(tp) or (tp,))
        step = 1 if whole else 1e-6
        for bound, outside, inclusive in ((low, -step, whole or "ge" in f.metadata),
                                          (high, step, whole or "le" in f.metadata)):
            if bound is None:
                continue
            extra = {"max_steps": 5} if (section, f.name) == ("train", "num_train_epochs") else {}
            with pytest.raises(UserError, match=f"{section}.{f.name}"):
                cfgmod.from_dict({section: {f.name: bound + outside, **extra}})
            if inclusive and not (section == "train" and f.name == "max_steps"):  # -1 alone trains zero steps
                cfgmod.from_dict({section: {f.name: bound, **extra}})
    assert checked >= 15  # r, dropout, lr, steps, batch sizes, lengths, warmup, budget, eval split, rows ...


def test_seed_boxes_allow_every_seed_the_check_takes(app: gr.Blocks) -> None:
    """TrainSettings.seed is lt=2**32: Settings' Seed box and Compare's both stop at 2**32 - 1, and the
    config takes that seed (the box let 2**32 through, which the check then refused)."""
    settings = _tab(app, "settings")[elem_id("train", "seed")]
    compare = _tab(app, "compare")["p3-compare-seed"]
    for box in (settings, compare):
        assert (box.minimum, box.maximum) == (0, 2**32 - 1), box
    assert cfgmod.from_dict({"train": {"seed": 2**32 - 1}}).train.seed == 2**32 - 1


@dataclasses.dataclass
class _Bounded:
    whole_open: int = setting(5, "", gt=0, lt=10)
    whole_closed: int | None = setting(None, "", ge=-3, le=3)
    real_open: float = setting(0.5, "", gt=0, lt=1)
    real_closed: float = setting(0.5, "", ge=0.25, le=0.75)
    free: int = setting(0, "")


def test_field_bounds_turns_a_whole_numbers_exclusive_bound_inclusive() -> None:
    assert cfgmod.field_bounds(_Bounded, "whole_open") == (1, 9)
    assert cfgmod.field_bounds(_Bounded, "whole_closed") == (-3, 3)
    assert cfgmod.field_bounds(_Bounded, "real_open") == (0, 1)  # a widget's bounds are inclusive; the check refuses
    assert cfgmod.field_bounds(_Bounded, "real_closed") == (0.25, 0.75)
    assert cfgmod.field_bounds(_Bounded, "free") == (None, None)
    assert cfgmod.field_bounds(cfgmod.TrainSettings, "seed") == (0, 2**32 - 1)


def test_widget_values_round_trip_through_the_schema(tiny_phi3_dir: Path) -> None:
    from phi3_lora import models

    info = models.model_info(str(tiny_phi3_dir))
    config = cfgmod.preset("quality-gpu").replace(
        model={"name": str(tiny_phi3_dir), "chat_template": None},
        train={"memory_budget_gb": 20.0, "num_processes": 2, "packing": False, "eval_steps": 10},
        data={"on_invalid": "refuse", "hub_split": "validation", "max_rows": 500},
        lora={"modules_to_save": ["lm_head"]})
    keys = [f"{s}.{f.name}" for s, f in FIELDS if f.metadata.get("tab") != DATASET_TAB]
    shown = dict(zip(keys, values_from_config(config, keys, info.linear_names)))
    assert shown["train.num_processes"] == "2" and shown["lora.modules_to_save"] == "lm_head"
    back = config_from_values(shown, info.linear_names, "quality-gpu")
    assert back.train == config.train and back.lora == config.lora and back.model == config.model
    assert (back.data.on_invalid, back.data.hub_split, back.data.max_rows) == ("refuse", "validation", 500)


def test_a_budget_set_in_the_running_app_reaches_the_config(tmp_path: Path, tiny_phi3_dir: Path) -> None:
    """Through the server: the estimate and Show config take the new widgets by field name."""
    from gradio_client import Client

    demo = build_app(tmp_path / "runs", default_model=str(tiny_phi3_dir))
    _, url, _ = launch(demo, port=None, prevent_thread_lock=True, quiet=True)
    try:
        c = Client(url, verbose=False)
        params = c.view_api(print_info=False, return_format="dict")["named_endpoints"]["/show_config"]["parameters"]
        args = [p.get("parameter_default") for p in params]
        labels = [p.get("label") for p in params]
        args[labels.index("GPU memory budget (GiB)")] = 20
        args[labels.index("Bad rows")] = "refuse"
        args[labels.index("Data source")] = "data/sample_chat.jsonl"
        yaml_text = c.predict(*args, api_name="/show_config")[0]
        value = yaml_text["value"] if isinstance(yaml_text, dict) else yaml_text
        assert "memory_budget_gb: 20" in value and "on_invalid: refuse" in value
    finally:
        demo.close()
