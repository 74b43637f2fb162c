"""Compare's "base" is the base, "tuned" is what was trained (issue 14, items 1-3 and 10).

Real runs on tiny models: a Qwen2-shaped model with q/k/v biases (so lora.bias all / lora_only have something to
train), the tiny Llama (tied embeddings) and the embedded tokenizer. Each test fails when its fix is undone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers.tiny_models import build_tiny_qwen2
from helpers.training import write_rows
from phi3_lora import train
from phi3_lora.config import ModelSettings, RunConfig
from phi3_lora.generate import ChatEngine, GenerationSettings
from phi3_lora.adapter_folder import locate_adapter
from phi3_lora.runs import RunDir

HISTORY = [{"role": "user", "content": "Who are you?"}]
ANSWER = "My name is Quillon, the keeper of lighthouses."


def quick_config(model_dir: Path, data: Path, **sections) -> RunConfig:
    cfg = RunConfig().replace(
        model={"name": str(model_dir), "load_in_4bit": False},
        lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        train={"max_steps": 3, "learning_rate": 5e-2, "per_device_train_batch_size": 4, "save_steps": 50,
               "warmup_ratio": 0.0, "lr_scheduler_type": "constant", "max_length": 64},
        data={"source": str(data), "eval_fraction": 0.0})
    return cfg.replace(**sections) if sections else cfg


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    """Untied, with SmolLM2's template and non-zero q/k/v biases (what the bias modes train)."""
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"), qwen_template=False, tied=False,
                            random_biases=True)


@pytest.fixture(scope="module")
def bias_runs(tmp_path_factory, qwen_dir) -> dict[str, Path]:
    """One 3-step run per lora.bias mode on the tiny Qwen2."""
    tmp = tmp_path_factory.mktemp("bias_runs")
    data = write_rows(tmp / "d.jsonl", n=12, answer=ANSWER)
    out = {}
    for mode in ("none", "all", "lora_only"):
        train.run(quick_config(qwen_dir, data, lora={"bias": mode}), tmp / mode)
        out[mode] = RunDir(tmp / mode).adapter
    return out


@pytest.fixture(scope="module")
def fresh_base_logits(qwen_dir) -> torch.Tensor:
    engine = ChatEngine(str(qwen_dir))
    return engine.forward_logits(engine.prompt_ids(HISTORY), adapter=False)


@pytest.mark.slow
def test_trained_biases_really_changed_the_base_tensors(bias_runs):
    """The precondition of item 1: bias all trains every bias of the base (k_proj's too, a layer without LoRA),
    lora_only those of the LoRA layers; both are saved with the adapter and written into the base on load."""
    from safetensors.torch import load_file

    saved = {mode: sorted(k for k in load_file(str(path / "adapter_model.safetensors")) if k.endswith("bias"))
             for mode, path in bias_runs.items()}
    assert saved["none"] == []
    assert any("k_proj.bias" in k for k in saved["all"])  # a non-LoRA layer's bias: only disable-safe if restored
    assert saved["lora_only"] and not any("k_proj" in k for k in saved["lora_only"])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "all", "lora_only"])
def test_base_side_is_the_fresh_base_in_every_bias_mode(mode, bias_runs, qwen_dir, fresh_base_logits):
    engine = ChatEngine(str(qwen_dir), bias_runs[mode])
    ids = engine.prompt_ids(HISTORY)
    base = engine.forward_logits(ids, adapter=False)
    tuned = engine.forward_logits(ids, adapter=True)
    assert (base - fresh_base_logits).abs().max().item() == 0.0
    assert (tuned - fresh_base_logits).abs().max().item() > 1e-2  # the adapter does change the answer
    # the streamed base answer is the fresh base's answer too (sequential, not mixed, when biases were trained)
    settings = GenerationSettings(temperature=0, max_new_tokens=8)
    base_text = ""
    for base_text, _ in engine.stream_pair(HISTORY, HISTORY, settings):
        pass
    fresh = ChatEngine(str(qwen_dir))
    assert base_text == fresh.answer(HISTORY, adapter=False, settings=settings)


@pytest.mark.slow
def test_adapter_switches_keep_the_base_the_base(bias_runs, qwen_dir, fresh_base_logits):
    engine = ChatEngine(str(qwen_dir), bias_runs["all"])
    ids = engine.prompt_ids(HISTORY)
    engine.set_adapter(bias_runs["none"])  # the cached engine of Compare, switched to a bias=none run
    assert (engine.forward_logits(ids, adapter=False) - fresh_base_logits).abs().max().item() == 0.0
    only = ChatEngine(str(qwen_dir), bias_runs["none"])
    assert torch.equal(engine.forward_logits(ids, adapter=True), only.forward_logits(ids, adapter=True))
    engine.set_adapter(bias_runs["lora_only"])
    engine.set_adapter(None)
    assert not engine.has_adapter
    assert (engine.forward_logits(ids, adapter=False) - fresh_base_logits).abs().max().item() == 0.0


@pytest.mark.slow
def test_set_adapter_none_then_answer_with_the_base(bias_runs, qwen_dir):
    """Item 10: an adapter-less PeftModel raised KeyError: 'tuned' on the next base answer."""
    engine = ChatEngine(str(qwen_dir), bias_runs["none"])
    engine.set_adapter(None)
    settings = GenerationSettings(temperature=0, max_new_tokens=6)
    assert engine.answer(HISTORY, adapter=False, settings=settings) == \
        ChatEngine(str(qwen_dir)).answer(HISTORY, adapter=False, settings=settings)
    texts = list(engine.stream_pair(HISTORY, HISTORY, settings))
    assert texts and texts[-1][1] == ""
    engine.set_adapter(bias_runs["none"])  # and back on
    assert engine.answer(HISTORY, adapter=True, settings=settings) is not None


CUSTOM_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.slow
def test_inference_prompt_is_the_training_prefix_with_a_custom_template(tmp_path, tiny_llama_dir):
    """Item 2: training used the custom template (no default system prompt); Compare must render the same."""
    data = write_rows(tmp_path / "d.jsonl", n=4, answer=ANSWER)
    (tmp_path / "t.jinja").write_text(CUSTOM_TEMPLATE)
    cfg = quick_config(tiny_llama_dir, data, model={"chat_template": str(tmp_path / "t.jinja")},
                       train={"max_steps": 1})
    built = train.build(cfg, tmp_path / "probe")
    trained_ids = built.trainer.train_dataset[0]["input_ids"]
    train.run(cfg, tmp_path / "run")
    engine = ChatEngine(str(tiny_llama_dir), RunDir(tmp_path / "run").adapter)
    row = json.loads(data.read_text().splitlines()[0])["messages"]
    prompt = engine.prompt_ids(row[:1])
    assert trained_ids[:len(prompt)] == prompt
    answer = engine.tokenizer(row[1]["content"], add_special_tokens=False)["input_ids"]
    assert trained_ids[len(prompt):len(prompt) + len(answer)] == answer
    assert "SmolLM" not in engine.tokenizer.decode(prompt)  # the model's default system prompt is not added
    engine.set_adapter(None)  # without the adapter, the model's own template again
    assert "SmolLM" in engine.tokenizer.decode(engine.prompt_ids(row[:1]))


@pytest.mark.slow
def test_compare_loads_4bit_with_the_runs_bitsandbytes_settings(tmp_path, tiny_llama_dir):
    """Item 3: a run trained with fp4, no double quant, is compared as fp4 without double quant."""
    pytest.importorskip("bitsandbytes")
    from phi3_lora.ui.adapters import engine_settings

    cfg = quick_config(tiny_llama_dir, write_rows(tmp_path / "d.jsonl", n=4, answer=ANSWER), train={"max_steps": 1},
                       model={"load_in_4bit": True, "bnb_4bit_quant_type": "fp4",
                              "bnb_4bit_use_double_quant": False, "dtype": "float32"})
    train.run(cfg, tmp_path / "run")
    ref = locate_adapter(tmp_path / "run")
    for engine in (ChatEngine(ref.model_name, None, model_settings=engine_settings(ref)),  # the app's path
                   ChatEngine(ref.model_name, ref.adapter_dir, load_in_4bit=True)):       # the CLI's path
        layer = engine.base.model.layers[0].self_attn.q_proj
        layer = getattr(layer, "base_layer", layer)
        state = layer.weight.quant_state
        assert state.quant_type == "fp4" and not state.nested
        assert layer.compute_dtype == torch.float32
    assert ModelSettings().bnb_4bit_quant_type == "nf4"  # so the default alone would have been wrong
