"""RunConfig: YAML round trip, checks with fixable messages, presets, the cookbook dicts."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from phi3_lora import config as c
from phi3_lora.config import from_dict
from phi3_lora.errors import UserError

# Verbatim from the Phi-3 model card's sample_finetune.py.
COOKBOOK_TRAINING = {
    "bf16": True, "do_eval": False, "learning_rate": 5.0e-06, "log_level": "info", "logging_steps": 20,
    "logging_strategy": "steps", "lr_scheduler_type": "cosine", "num_train_epochs": 1, "max_steps": -1,
    "output_dir": "./checkpoint_dir", "overwrite_output_dir": True, "per_device_eval_batch_size": 4,
    "per_device_train_batch_size": 4, "remove_unused_columns": True, "save_steps": 100, "save_total_limit": 1,
    "seed": 0, "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False},
    "gradient_accumulation_steps": 1, "warmup_ratio": 0.2,
}
COOKBOOK_PEFT = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "bias": "none", "task_type": "CAUSAL_LM",
                 "target_modules": "all-linear", "modules_to_save": None}


def test_yaml_round_trip_keeps_every_field(tmp_path):
    cfg = c.preset("quality-gpu").replace(lora={"target_modules": ["qkv_proj", "o_proj"], "use_dora": True},
                                          data={"mapping": {"prompt": "question"}})
    c.save_yaml(cfg, tmp_path / "run.yaml")
    assert c.load_yaml(tmp_path / "run.yaml") == cfg


def test_yaml_documents_each_field():
    text = c.dump_yaml(c.RunConfig())
    assert "# LoRA rank." in text and "learning_rate: 0.0002" in text


@pytest.mark.parametrize("section, values, words", [
    ("lora", {"r": 0}, "lora.r"),
    ("lora", {"bias": "some"}, "none, all, lora_only"),
    ("train", {"learning_rate": 3}, "learning_rate"),
    ("train", {"num_train_epochs": 0, "max_steps": -1}, "zero steps"),
    ("train", {"packing": "maybe"}, "auto"),
    ("data", {"on_invalid": "ignore"}, "drop or refuse"),
    ("model", {"dtype": "int3"}, "bfloat16"),
    # one check, from the schema's metadata (choices, gt/ge/lt/le), for every field that has them
    ("model", {"bnb_4bit_quant_type": "int4"}, "model.bnb_4bit_quant_type must be nf4 or fp4"),
    ("model", {"attn_implementation": "fast"}, "sdpa_varlen"),
    ("lora", {"lora_alpha": 0}, "lora.lora_alpha must be above 0"),
    ("lora", {"fused_slices": ["q", "o"]}, r"lora.fused_slices has unknown value\(s\) \['o'\]"),
    ("train", {"lr_scheduler_type": "step"}, "cosine_with_restarts"),
    ("train", {"gradient_checkpointing": "sometimes"}, "train.gradient_checkpointing must be true or false or 'auto'"),
    ("data", {"format": "csv"}, "sharegpt"),
])
def test_bad_values_name_the_field_and_the_fix(section, values, words):
    with pytest.raises(UserError, match=words):
        c.RunConfig().replace(**{section: values})


def test_unknown_keys_are_listed():
    with pytest.raises(UserError, match="learning_rat"):
        c.from_dict({"train": {"learning_rat": 1e-4}})
    with pytest.raises(UserError, match="optimizer"):
        c.from_dict({"optimizer": {}})


def test_form_strings_are_coerced():
    cfg = c.from_dict({"train": {"learning_rate": "1e-4", "max_steps": "10", "eval_steps": "", "packing": "true"},
                       "lora": {"target_modules": "q_proj, v_proj"}})
    assert cfg.train.learning_rate == 1e-4 and cfg.train.max_steps == 10 and cfg.train.eval_steps is None
    assert cfg.train.packing is True and cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_cookbook_dicts_load_unchanged_and_equal_the_preset():
    cfg, notes = c.from_recipe(COOKBOOK_TRAINING, COOKBOOK_PEFT, max_seq_length=2048, hardware=c.Hardware(cuda=True, cuda_bf16=True))
    preset = c.preset("cookbook")
    assert cfg.train == preset.train and cfg.lora == preset.lora
    assert cfg.train.learning_rate == 5e-6 and cfg.train.warmup_ratio == 0.2 and cfg.train.max_length == 2048
    assert any("output_dir" in n for n in notes) and any("task_type" in n for n in notes)


def test_cookbook_warns_about_its_learning_rate():
    assert any("5e-6 is low for LoRA" in w for w in c.preset_warnings(c.preset("cookbook")))
    assert c.preset_warnings(c.preset("quick-cpu")) == []


def test_unknown_recipe_key_is_refused():
    with pytest.raises(UserError, match="deepspeed"):
        c.from_recipe({"deepspeed": "ds.json"}, {})


def test_every_field_has_help():
    for cls in c.SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert len(f.metadata.get("help", "")) > 10, f"{cls.__name__}.{f.name} has no help"


def test_yaml_file_errors_are_user_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        c.load_yaml(tmp_path / "bad.yaml")
    with pytest.raises(UserError, match="does not exist"):
        c.load_yaml(tmp_path / "missing.yaml")
    assert yaml.safe_load(c.dump_yaml(c.RunConfig()))["lora"]["r"] == 16


# --- one generic check over the schema (issue 13 item 8) -------------------------------------------------------

@pytest.mark.parametrize("section,values,phrase", [
    ("lora", {"lora_alpha": "Infinity"}, "lora.lora_alpha must be a finite number"),
    ("lora", {"lora_alpha": 0}, "lora.lora_alpha must be"),
    ("train", {"seed": -1}, "train.seed must be at least 0 and below 4,294,967,296"),
    ("train", {"seed": 2**32}, "train.seed must be at least 0"),
    ("train", {"weight_decay": float("nan")}, "train.weight_decay must be a finite number"),
    ("train", {"weight_decay": -0.01}, "train.weight_decay must be at least 0"),
    ("train", {"num_train_epochs": "nan"}, "train.num_train_epochs must be a finite number"),
    ("train", {"num_train_epochs": float("inf")}, "train.num_train_epochs must be a finite number"),
    ("model", {"name": 5}, "model.name must be text"),
    ("train", {"seed": {"a": 1}}, "train.seed must be a whole number"),
    ("data", {"mapping": 5}, "data.mapping must be a mapping"),
])
def test_bad_numbers_and_types_are_refused(section, values, phrase):
    with pytest.raises(UserError, match=re.escape(phrase)):
        from_dict({section: values})


def test_every_float_field_of_the_schema_refuses_nan_and_infinity():
    import dataclasses
    import typing

    from phi3_lora.config import SECTIONS

    checked = 0
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if "float" not in str(typing.get_type_hints(cls)[f.name]):
                continue
            for bad in (float("nan"), float("inf"), float("-inf")):
                with pytest.raises(UserError, match="finite"):
                    from_dict({section: {f.name: bad}})
            checked += 1
    assert checked >= 8  # learning_rate, epochs, warmup, weight_decay, grad norm, alpha, dropout, budget, eval split


def test_seed_bounds_are_inclusive_of_the_last_valid_value():
    assert from_dict({"train": {"seed": 0}}).train.seed == 0
    assert from_dict({"train": {"seed": 2**32 - 1}}).train.seed == 2**32 - 1


def test_modules_to_save_is_checked_against_the_model(tiny_llama_dir, tmp_path):
    from transformers import AutoConfig

    from phi3_lora import jobs
    from phi3_lora.runs import run_dirs
    from phi3_lora.targets import count_lora_parameters

    model_config = AutoConfig.from_pretrained(tiny_llama_dir)
    ok = from_dict({"lora": {"modules_to_save": ["lm_head"]}}).lora
    assert count_lora_parameters(model_config, ok)[0] > 0
    bad = from_dict({"model": {"name": str(tiny_llama_dir), "load_in_4bit": False},
                     "lora": {"modules_to_save": ["lm_head", "score_head"]}, "data": {"source": "unused.jsonl"}})
    with pytest.raises(UserError, match="modules_to_save has name.*score_head"):
        count_lora_parameters(model_config, bad.lora)
    with pytest.raises(UserError, match="score_head"):  # refused at Start, before any process or folder
        jobs.start_run(bad, tmp_path, check_data=False)
    assert run_dirs(tmp_path) == []
