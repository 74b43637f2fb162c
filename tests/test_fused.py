"""LoRA on slices of Phi-3's fused layers: the split is exact, counts match peft, training and export work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Phi3Config

from helpers.training import write_rows
from phi3_lora import export, families, fused, guide, models, targets, train
from phi3_lora.targets import count_lora_parameters
from phi3_lora.config import LoraSettings, ModelSettings, RunConfig
from phi3_lora.errors import UserError
from phi3_lora.generate import ChatEngine, GenerationSettings
from phi3_lora.runs import RunDir

IDS = torch.tensor([[1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203],
                    [1, 22172, 29892, 920, 526, 366, 29973, 32007, 32001, 306, 626, 1781]])
PHI3_MINI = Phi3Config(hidden_size=3072, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       intermediate_size=8192, vocab_size=32064)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture()
def tiny(tiny_phi3_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_phi3_dir, dtype=torch.float32).eval()


def test_split_model_equals_fused_and_restores_to_stock(tiny) -> None:
    before = logits(tiny)
    assert fused.split_fused_layers(tiny, ["qkv_proj", "gate_up_proj"]) == 4
    attn = tiny.model.layers[0].self_attn.qkv_proj
    assert isinstance(attn, fused.FusedSlices) and [attn.q_proj.out_features, attn.k_proj.out_features] == [64, 64]
    assert attn.q_proj.weight.data_ptr() != attn.k_proj.weight.data_ptr()  # separate storage
    assert targets.linear_module_names(tiny) == ["o_proj", "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj",
                                                "down_proj"]
    assert torch.equal(logits(tiny), before)
    fused.restore_fused_layers(tiny)
    assert fused.split_groups(tiny) == () and "model.layers.0.self_attn.qkv_proj.weight" in tiny.state_dict()
    assert torch.equal(logits(tiny), before)


def test_split_sizes_follow_grouped_query_attention() -> None:
    config = Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                        num_attention_heads=8, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    fused.split_fused_layers(model, ["qkv_proj", "gate_up_proj"])
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert (qkv.q_proj.out_features, qkv.k_proj.out_features, qkv.v_proj.out_features) == (64, 16, 16)
    assert model.model.layers[0].mlp.gate_up_proj.up_proj.out_features == 96
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


@pytest.mark.parametrize("requantize", [False, True], ids=["cut-codes", "requantize"])
def test_4bit_split_matches_the_fused_4bit_model(tiny_phi3_dir: Path, requantize: bool) -> None:
    def load() -> torch.nn.Module:
        return models.load_model(ModelSettings(name=str(tiny_phi3_dir), load_in_4bit=True, dtype="float32"),
                                 device="cpu").eval()

    before = logits(load())
    model = load()
    fused.split_fused_layers(model, ["qkv_proj", "gate_up_proj"], requantize=requantize)
    assert type(model.model.layers[0].self_attn.qkv_proj.v_proj).__name__ == "Linear4bit"
    after = logits(model)
    if not requantize:  # codes and block scales are cut, not recomputed: the same weights bit for bit
        assert torch.equal(after, before)
    else:  # dequantise -> re-quantise re-rounds the double-quantised block scales
        assert (after - before).abs().max() <= 0.01 * before.abs().max(), (after - before).abs().max()
    fused.restore_fused_layers(model)
    assert type(model.model.layers[0].self_attn.qkv_proj).__name__ == "Linear4bit"
    assert torch.equal(logits(model), after)


SELECTIONS = [
    (["qkv_proj"], ["q", "v"]),
    (["qkv_proj", "o_proj"], ["q", "k", "v"]),
    ("all-linear", ["q", "v"]),
    (["gate_up_proj", "down_proj"], ["gate"]),
    (["o_proj"], ["v", "up"]),
]


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("targets,slices", SELECTIONS, ids=lambda v: str(v))
def test_trainable_counts_match_peft_for_each_selection(tiny, targets, slices, use_dora: bool) -> None:
    lora = LoraSettings(r=4, target_modules=targets, fused_slices=slices, use_dora=use_dora)
    counted = count_lora_parameters(tiny.config, lora)
    peft_model = guide.add_lora(AutoModelForCausalLM.from_config(tiny.config), lora)
    assert peft_model.get_nb_trainable_parameters() == counted
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters() if ".lora_A" in n}
    assert {f"{s}_proj" for s in slices} <= adapted
    unchosen = {f"{s}_proj" for g in families.PHI3.fused.values() for s in g if s not in slices}
    assert not adapted & unchosen and "qkv_proj" not in adapted


def test_phi3_mini_counts_from_its_config() -> None:
    def count(targets, slices=()) -> int:
        return count_lora_parameters(PHI3_MINI, LoraSettings(r=16, target_modules=targets,
                                                                    fused_slices=list(slices)))[0]

    assert count("all-linear") == 25_165_824
    assert count(["qkv_proj"], ["q", "v"]) == 6_291_456
    assert count(["qkv_proj", "o_proj"], ["q", "k", "v"]) == 12_582_912
    assert count(["qkv_proj", "o_proj"]) == 9_437_184  # q,k,v,o with qkv_proj adapted whole (one shared A)
    assert count(["gate_up_proj", "down_proj"]) == 15_728_640


def test_fused_slices_on_a_model_without_fused_layers_is_a_user_error(tiny_llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with pytest.raises(UserError) as err:
        count_lora_parameters(model.config, LoraSettings(fused_slices=["q", "v"]))
    assert "q_proj, v_proj" in str(err.value) and "target_modules" in str(err.value)


@pytest.mark.slow
def test_qlora_on_q_v_trains_loads_and_merges_to_a_stock_phi3(tmp_path: Path, tiny_phi3_dir: Path) -> None:
    data = write_rows(tmp_path / "d.jsonl", n=12, question="Q{i}: who are you?", answer="I am Quillon.")
    cfg = RunConfig().replace(
        model={"name": str(tiny_phi3_dir), "load_in_4bit": True},
        lora={"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["qkv_proj", "o_proj"],
              "fused_slices": ["q", "v"]},
        train={"max_steps": 3, "learning_rate": 1e-2, "per_device_train_batch_size": 4, "save_steps": 3,
               "warmup_ratio": 0.0, "max_length": 64},
        data={"source": str(data), "eval_fraction": 0.0})
    result = train.run(cfg, tmp_path / "run")
    assert result.status == "finished"
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert any("qkv_proj.q_proj.lora_A" in k for k in weights) and any("qkv_proj.v_proj.lora_B" in k for k in weights)
    assert not any("k_proj.lora" in k or "gate" in k for k in weights)
    assert fused.split_needed(result.adapter_dir) == ("qkv_proj",)
    assert fused.split_needed(RunDir(tmp_path / "run").checkpoint(3)) == ("qkv_proj",)

    engine = ChatEngine(str(tiny_phi3_dir), result.adapter_dir, load_in_4bit=True)  # splits from the key layout
    assert fused.split_groups(engine.base) == ("qkv_proj",)
    history = [{"role": "user", "content": "Q99: who are you?"}]
    assert engine.answer(history, adapter=True, settings=GenerationSettings(temperature=0, max_new_tokens=4))

    # base 16bit: the slices merge into the stock fp32 qkv weight, compared with fp32 base + adapter below (the
    # default for a QLoRA run merges into the dequantised 4-bit base; test_faithful_export checks that one)
    merged_dir = export.merge_adapter(tmp_path / "run", tmp_path / "merged", dtype="float32", base="16bit")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert merged.config.model_type == "phi3" and type(merged).__name__ == "Phi3ForCausalLM"
    keys = set(load_file(merged_dir / "model.safetensors"))
    assert "model.layers.0.self_attn.qkv_proj.weight" in keys and not any("q_proj" in k or "lora" in k for k in keys)
    base = guide.load_base(str(tiny_phi3_dir), load_in_4bit=False, dtype="float32")
    with_adapter = guide.load_lora(base, result.adapter_dir)
    expected = logits(with_adapter)
    with with_adapter.disable_adapter():
        assert not torch.allclose(logits(with_adapter), expected, atol=1e-3)  # training moved the q/v slices
    torch.testing.assert_close(logits(merged), expected, rtol=1e-4, atol=1e-4)


def test_chat_engine_swaps_between_split_and_whole_layer_adapters(tmp_path: Path, tiny_phi3_dir: Path) -> None:
    for name, lora in (("qv", LoraSettings(r=2, target_modules=["qkv_proj"], fused_slices=["q", "v"])),
                       ("whole", LoraSettings(r=2, target_modules=["qkv_proj", "gate_up_proj"]))):
        base = AutoModelForCausalLM.from_pretrained(tiny_phi3_dir, dtype=torch.float32)
        guide.add_lora(base, lora).save_pretrained(tmp_path / name)
    engine = ChatEngine(str(tiny_phi3_dir), tmp_path / "qv")
    assert fused.split_groups(engine.base) == ("qkv_proj",)
    engine.set_adapter(tmp_path / "whole")
    assert fused.split_groups(engine.base) == () and "tuned" in engine.model.peft_config
    engine.set_adapter(tmp_path / "qv")
    assert fused.split_groups(engine.base) == ("qkv_proj",)
    settings = GenerationSettings(temperature=0, max_new_tokens=3)
    history = [{"role": "user", "content": "Hi"}]
    assert engine.answer(history, adapter=True, settings=settings) == engine.answer(history, False, settings)


def test_settings_tab_counts_the_slice_selection_live(tiny_phi3_dir: Path) -> None:
    from phi3_lora.ui import settings

    info = models.model_info(str(tiny_phi3_dir))
    assert info.fused and "embed_tokens" in info.targets and "fused_slices" not in info.targets
    keys = ["model.name", "lora.r", "lora.target_modules", "lora.fused_slices", "lora.modules_to_save"]
    config = settings.config_from_values(dict(zip(keys, [str(tiny_phi3_dir), 4, ["qkv_proj"], ["q", "v"], "lm_head"])),
                                         info.linear_names)
    assert config.lora.fused_slices == ["q", "v"] and config.lora.modules_to_save == ["lm_head"]
    trainable = count_lora_parameters(AutoModelForCausalLM.from_pretrained(tiny_phi3_dir).config, config.lora)[0]
    assert f"<b>{trainable:,}</b>" in settings.estimate_html(config, info)
    assert settings.values_from_config(config, keys[2:], info.linear_names) == [["qkv_proj"], ["q", "v"], "lm_head"]
