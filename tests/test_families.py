"""The model-family registry on real tiny models: Qwen2 (q/k/v biases, its own template) is one entry in
families.py, and every part of phi3_lora that differs by architecture picks it up from there."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from helpers.training import write_rows
from phi3_lora import families, models, targets
from phi3_lora.config import LoraSettings, RunConfig
from phi3_lora.errors import UserError
from phi3_lora.estimate import lora_parameter_count, model_shape


@pytest.fixture(scope="module")
def tiny_qwen2(tiny_qwen2_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)


def test_every_model_type_has_one_family() -> None:
    types = [t for f in families.FAMILIES for t in f.model_types]
    assert len(types) == len(set(types))
    assert families.family_of("qwen2") is families.QWEN2 and families.family_of("phi3") is families.PHI3
    assert families.family_of({"model_type": "some-new-arch"}) is families.OTHER


def test_qwen2_is_its_own_family_with_separate_biased_projections(tiny_qwen2) -> None:
    assert families.family_of(tiny_qwen2) is families.QWEN2
    assert targets.linear_module_names(tiny_qwen2) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"]
    assert tiny_qwen2.model.layers[0].self_attn.q_proj.bias is not None
    with pytest.raises(UserError, match="separate"):
        targets.resolve_target_modules(tiny_qwen2, ["qkv_proj"])
    with pytest.raises(UserError, match="qkv_proj"):
        targets.plan(tiny_qwen2, LoraSettings(fused_slices=["q", "v"]))


def test_estimate_counts_qwen2_exactly(tiny_qwen2) -> None:
    shape = model_shape(tiny_qwen2.config)
    assert shape.total_params == sum(p.numel() for p in tiny_qwen2.parameters())  # biases and tied embeddings
    config = RunConfig().replace(lora={"r": 4})
    peft_model = get_peft_model(AutoModelForCausalLM.from_config(tiny_qwen2.config),
                                LoraConfig(r=4, target_modules="all-linear"))
    trainable = peft_model.get_nb_trainable_parameters()[0]
    assert lora_parameter_count(shape, config) == trainable


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_lora_count_on_qwen2_matches_peft(tiny_qwen2, bias: str) -> None:
    lora = LoraSettings(r=4, target_modules=["q_proj", "v_proj", "down_proj"], bias=bias)
    peft_model = get_peft_model(AutoModelForCausalLM.from_config(tiny_qwen2.config), LoraConfig(
        r=4, target_modules=lora.target_modules, bias=bias))
    assert targets.count_lora_parameters(tiny_qwen2.config, lora) == peft_model.get_nb_trainable_parameters()


def test_qwen2_gets_its_training_template(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    from trl.chat_template_utils import qwen2_5_chat_template, qwen2_5_training_chat_template

    assert models.load_tokenizer(str(tiny_qwen2_dir)).chat_template == qwen2_5_training_chat_template
    # A Qwen2.5 template that trl's exact-match lookup does not know (a comment added) but that renders the same:
    # the family's template is chosen because it renders like it; plain ChatML does not (default system prompt).
    variant = qwen2_5_chat_template + "{#- a local copy -#}"
    (tmp_path / "variant.jinja").write_text(variant)
    tok = models.load_tokenizer(str(tiny_qwen2_dir), chat_template=str(tmp_path / "variant.jinja"))
    assert tok.chat_template == qwen2_5_training_chat_template
    plain = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    plain.chat_template = variant
    with pytest.raises(UserError, match="no chat template"):
        models.training_chat_template(plain, families.OTHER)  # without the family: nothing fits


def test_generation_stops_at_qwen2_end_of_turn(tiny_qwen2_dir: Path) -> None:
    from phi3_lora.generate import stop_token_ids

    tok = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tok)
    assert set(families.QWEN2.end_tokens) <= set(families.end_tokens())


@pytest.mark.slow
def test_qwen2_catalogue_model_works_offline() -> None:
    info = models.model_info("Qwen/Qwen2.5-0.5B-Instruct")  # the Hub is off in tests: built-in sizes
    assert "built-in" in info.source and not info.fused and "q_proj" in info.linear_names
    assert any(e.name == info.name for e in models.CATALOGUE)
    expected = AutoModelForCausalLM.from_config(AutoConfig.for_model(**info.config), dtype=torch.bfloat16)
    # Qwen2.5-0.5B has 494M parameters (model card); the estimate counts its biases and tied embeddings
    assert model_shape(info.config).total_params == sum(p.numel() for p in expected.parameters())
    assert 0.49e9 < model_shape(info.config).total_params < 0.50e9


@pytest.mark.slow
def test_qlora_trains_and_answers_on_tiny_qwen2(tmp_path: Path, tiny_qwen2_dir: Path) -> None:
    from phi3_lora import train
    from phi3_lora.generate import ChatEngine, GenerationSettings

    data = write_rows(tmp_path / "d.jsonl", n=8, question="Q{i}: who are you?", answer="I am Quillon.")
    cfg = RunConfig().replace(
        model={"name": str(tiny_qwen2_dir), "load_in_4bit": True},
        lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "bias": "lora_only"},
        train={"max_steps": 2, "learning_rate": 1e-2, "per_device_train_batch_size": 4, "save_steps": 2,
               "warmup_ratio": 0.0, "max_length": 96},
        data={"source": str(data), "eval_fraction": 0.0})
    result = train.run(cfg, tmp_path / "run")
    assert result.status == "finished" and result.final_loss is not None
    engine = ChatEngine(str(tiny_qwen2_dir), result.adapter_dir, load_in_4bit=False)
    answer = engine.answer([{"role": "user", "content": "Hi"}], adapter=True,
                           settings=GenerationSettings(temperature=0, max_new_tokens=4))
    assert isinstance(answer, str)
