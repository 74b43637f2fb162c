"""Exports are what was trained, and prove it (issue 14, items 4-9 and the self-verifying export).

Real runs on the tiny Llama (tied embeddings, SmolLM2 tokenizer) and the embedded SmolLM2; verification starts a
real fresh Python process without phi3_lora.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from helpers import training
from phi3_lora import events, export, guide, train, verify
from phi3_lora.config import Hardware, RunConfig, from_recipe, recipe_dtype
from phi3_lora.embedded import HUB_ID
from phi3_lora.errors import UserError
from phi3_lora.formats import RowError, normalise_record
from phi3_lora.generate import ChatEngine
from phi3_lora.adapter_folder import locate_adapter
from phi3_lora.runs import RunDir


def write_rows(path: Path, n: int = 12) -> Path:
    return training.write_rows(path, n, question="Question {i}: who keeps the light?",
                               answer="Quillon keeps light number {i}.")


def argmax_agreement(model_a, model_b, rows: list[list[dict]], tokenizer) -> float:
    """Teacher-forced argmax agreement of two models over whole held-out conversations."""
    same = total = 0
    for messages in rows:
        ids = torch.tensor([tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]])
        with torch.no_grad():
            a, b = model_a(ids).logits[0].argmax(-1), model_b(ids).logits[0].argmax(-1)
        same, total = same + int((a == b).sum()), total + a.numel()
    return same / total


# --- 4 and 5: tied embeddings, QLoRA merge, and the merged export verifying itself ------------------------

@pytest.fixture(scope="module")
def tied_qlora_run(tmp_path_factory, tiny_llama_dir) -> Path:
    pytest.importorskip("bitsandbytes")
    tmp = tmp_path_factory.mktemp("tied")
    cfg = RunConfig().replace(
        model={"name": str(tiny_llama_dir), "load_in_4bit": True, "dtype": "float32"},
        lora={"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["embed_tokens", "q_proj", "v_proj"]},
        train={"max_steps": 4, "learning_rate": 5e-2, "per_device_train_batch_size": 4, "save_steps": 2,
               "warmup_ratio": 0.0, "lr_scheduler_type": "constant", "max_length": 64, "eval_answers": False},
        data={"source": str(write_rows(tmp / "d.jsonl", 20)), "eval_fraction": 0.2})
    train.run(cfg, tmp / "run")
    return tmp / "run"


@pytest.mark.slow
def test_embedding_adapter_is_saved_without_the_full_matrix(tied_qlora_run):
    from safetensors import safe_open

    for folder in (RunDir(tied_qlora_run).adapter, RunDir(tied_qlora_run).last_checkpoint()):
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            keys = list(f.keys())
        assert any("embed_tokens.lora_embedding_A" in k for k in keys)
        assert not any(k.endswith("embed_tokens.weight") or "base_layer.weight" in k for k in keys), keys
        size = (folder / "adapter_model.safetensors").stat().st_size
        assert size < 2_000_000, size  # the full 49152 x 64 fp32 embedding alone is 12.6 MB


@pytest.mark.slow
def test_qlora_merge_into_the_trained_4bit_base_with_untied_embeddings(tied_qlora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = locate_adapter(tied_qlora_run)
    engine = ChatEngine(ref.model_name, ref.adapter_dir, load_in_4bit=True)  # what Compare shows: 4-bit + adapter
    rows = [json.loads(line)["messages"] for line in RunDir(tied_qlora_run).eval_rows.read_text().splitlines()]
    merged_dir = export.merge_adapter(tied_qlora_run, tmp_path / "merged", dtype="float32", engine=engine)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert not merged.config.tie_word_embeddings
    assert merged.lm_head.weight.data_ptr() != merged.model.embed_tokens.weight.data_ptr()
    agree = argmax_agreement(merged, engine.model, rows, engine.tokenizer)
    print(f"merged (dequantised 4-bit base) vs 4-bit base+adapter: argmax agreement {agree:.4f}")
    assert agree >= 0.99
    card = (merged_dir / "README.md").read_text()
    assert "dequantised 4-bit base" in card and "## Verification" in card
    result = verify.load(merged_dir)
    print("merged export verification:", result.report())
    assert result is not None and result.ok and result.line() in card

    # The 16-bit base: what its card says (its fresh-process check is the one above, for another base).
    sixteen = export.merge_adapter(tied_qlora_run, tmp_path / "merged16", dtype="float32", base="16bit",
                                   verify=False)
    assert "original 16-bit base" in (sixteen / "README.md").read_text()
    other = AutoModelForCausalLM.from_pretrained(sixteen, dtype=torch.float32).eval()
    print(f"merged (16-bit base) vs 4-bit base+adapter: argmax agreement "
          f"{argmax_agreement(other, engine.model, rows, engine.tokenizer):.4f}")
    with pytest.raises(UserError, match="16-bit base"):
        export.merge_base_choice("4bit", load_in_4bit=False)


# --- 6 and the zip verifying itself: a Hub id as base, loadable where the cache folder is gone ------------

@pytest.mark.slow
def test_zip_names_the_hub_base_verifies_itself_and_loads_after_the_cache_moved(tmp_path, embedded_dir):
    cache = tmp_path / "phi3_cache"
    (cache / embedded_dir.name).mkdir(parents=True)
    for f in embedded_dir.iterdir():  # a private copy of the converted model (links: no 540 MB copy)
        (cache / embedded_dir.name / f.name).symlink_to(f.resolve())
    env_before = os.environ.get("PHI3_LORA_CACHE")
    os.environ["PHI3_LORA_CACHE"] = str(cache)
    try:
        cfg = RunConfig().replace(
            model={"name": "embedded", "load_in_4bit": False},
            lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            train={"max_steps": 1, "learning_rate": 1e-3, "per_device_train_batch_size": 2, "max_length": 48,
                   "eval_answers": False},
            data={"source": str(write_rows(tmp_path / "d.jsonl", 6)), "eval_fraction": 0.34})
        train.run(cfg, tmp_path / "run")
        path = export.adapter_zip(tmp_path / "run", tmp_path / "out")
    finally:
        os.environ.pop("PHI3_LORA_CACHE") if env_before is None else os.environ.update(PHI3_LORA_CACHE=env_before)
    result = verify.load(path)
    print("adapter zip verification:", result.report())
    assert result.ok and result.identical == result.total == 2 and result.source == "held-out"
    assert "AutoPeftModelForCausalLM" in result.loaded
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith("adapter_config.json"))
        assert json.loads(zf.read(name))["base_model_name_or_path"] == HUB_ID
        card = zf.read(name.replace("adapter_config.json", "README.md")).decode()
        zf.extractall(tmp_path / "unzipped")
    assert result.line() in card and result.line().startswith("verified: 2/2 held-out answers identical")
    cache.rename(tmp_path / "phi3_cache_moved")  # this machine's path to the base no longer exists
    hub = verify.hub_cache_alias(HUB_ID, embedded_dir, tmp_path / "hub")  # a machine that downloaded the Hub id
    script = ("import sys, torch\nfrom peft import AutoPeftModelForCausalLM\n"
              f"m = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / 'unzipped' / Path(name).parent)!r})\n"
              "print('lora layers', sum('lora_A' in n for n, _ in m.named_parameters()))\n"
              "print('phi3_lora imported', 'phi3_lora' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lora layers 60" in out.stdout and "phi3_lora imported False" in out.stdout, out.stdout


@pytest.mark.slow
def test_a_broken_export_is_reported_not_verified(tied_qlora_run, tmp_path):
    """The verifier really loads the file: a zip whose weights are swapped for another run's fails."""
    ref = locate_adapter(tied_qlora_run)
    reference = verify.reference(ref)
    folder = tmp_path / "bad" / "run"
    shutil.copytree(ref.adapter_dir, folder)
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "adapter_model.safetensors"))
    save_file({k: torch.zeros_like(v) if "lora_B" in k or "embedding_B" in k else v for k, v in state.items()},
              str(folder / "adapter_model.safetensors"))
    result = verify.verify_export(folder, "adapter", reference)
    print("zeroed adapter verification:", result.report())
    assert not result.ok and result.line().startswith("NOT verified") and result.differences


def test_verification_is_scored_from_the_childs_answers():
    ref = verify.Reference([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]], ["x y", "z"],
                           [[1, 2], [3]], [0], 8, "float32", "cpu", None, "held-out")
    same = {"answers": [{"text": "x y", "ids": [1, 2], "agreement": [2, 2]}, {"text": "z", "ids": [3],
                                                                              "agreement": [1, 1]}], "loaded": "m"}
    assert verify.compare("merged", ref, same).line() == "verified: 2/2 held-out answers identical"
    off = {"answers": [{"text": "x q", "ids": [1, 5], "agreement": [1, 2]}, same["answers"][1]], "loaded": "m"}
    result = verify.compare("merged", ref, off)
    assert result.line() == "NOT verified: 1/2 held-out answers identical, token agreement 0.6667 < 0.99"
    assert "differs from token 1 of 2" in result.differences[0]
    assert not verify.compare("merged", ref, {**same, "phi3_lora_imported": True}).ok


# --- 7: finetune() says what it ignores or replaces --------------------------------------------------------

@pytest.mark.slow
def test_recipe_keys_are_warnings_in_train_log_and_events(tmp_path, tiny_llama_dir):
    training_config = {"bf16": False, "do_eval": False, "learning_rate": 1e-3, "max_steps": 2, "logging_steps": 50,
                       "per_device_train_batch_size": 4, "report_to": "none", "output_dir": "./checkpoint_dir",
                       "save_steps": 100}
    peft_config = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}
    with pytest.warns(guide.RecipeWarning) as caught:
        result = guide.finetune(training_config, peft_config, data=str(write_rows(tmp_path / "d.jsonl", 8)),
                                model=str(tiny_llama_dir), run_dir=tmp_path / "run", max_seq_length=64)
    messages = [str(w.message) for w in caught if issubclass(w.category, guide.RecipeWarning)]
    assert any("output_dir" in m for m in messages)  # the run folder is ours
    assert not any("report_to" in m for m in messages)  # train.report_to is a setting now (issue 18): it is used
    assert any("task_type" in m for m in messages)
    log = RunDir(tmp_path / "run").log.read_text()
    warned = [e["message"] for e in events.read_events(tmp_path / "run") if e["type"] == "warning"]
    assert warned == messages and all(f"warning: {m}" in log for m in messages)
    assert RunDir(tmp_path / "run").eval_rows.read_text() == ""  # do_eval False: nothing held out
    assert result.final_loss is not None  # logging_steps 50 > 2 steps: read from train_loss
    assert json.loads((result.adapter_dir / "run_summary.json").read_text())["eval_rows"] == 0


def test_recipe_precision_flags_follow_the_hardware():
    gpu_bf16, old_gpu, cpu = Hardware(cuda=True, cuda_bf16=True), Hardware(cuda=True), Hardware(cuda=False)
    assert recipe_dtype(True, None, gpu_bf16) == ("bfloat16", [])
    dtype, notes = recipe_dtype(True, None, old_gpu)
    assert dtype == "float16" and "no bfloat16" in notes[0]
    dtype, notes = recipe_dtype(None, True, cpu)
    assert dtype == "float32" and "needs a CUDA GPU" in notes[0]
    assert recipe_dtype(False, False, gpu_bf16) == ("float32", [])
    assert recipe_dtype(None, None, cpu) == ("auto", [])
    cfg, notes = from_recipe({"bf16": True, "do_eval": False}, {}, hardware=gpu_bf16)
    assert cfg.model.dtype == "bfloat16" and cfg.data.eval_fraction == 0.0 and notes == []
    cfg, notes = from_recipe({"do_eval": False}, {}, data={"eval_fraction": 0.2}, hardware=gpu_bf16)
    assert cfg.data.eval_fraction == 0.2 and "do_eval" in notes[0]
    with pytest.raises(UserError, match="both bf16 and fp16"):
        from_recipe({"bf16": True, "fp16": True}, {}, hardware=gpu_bf16)


# --- 8: totals over every attempt of a resumed run ---------------------------------------------------------

@pytest.mark.slow
def test_resumed_run_reports_steps_and_time_of_all_attempts(tmp_path, tiny_llama_dir):
    data = write_rows(tmp_path / "d.jsonl", 8)
    base = dict(model={"name": str(tiny_llama_dir), "load_in_4bit": False},
                lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj"]},
                data={"source": str(data), "eval_fraction": 0.0})
    first = train.run(RunConfig().replace(**base, train={"max_steps": 2, "save_steps": 2, "max_length": 48,
                                                         "per_device_train_batch_size": 4}), tmp_path / "run")
    second = train.run(RunConfig().replace(**base, train={"max_steps": 4, "save_steps": 2, "max_length": 48,
                                                          "per_device_train_batch_size": 4}),
                       tmp_path / "run", resume=True)
    summary = json.loads((second.adapter_dir / "run_summary.json").read_text())
    assert summary["steps"] == 4 and summary["steps_this_attempt"] == 2 and summary["attempts"] == 2
    assert summary["seconds"] > summary["seconds_this_attempt"] > 0
    assert summary["seconds"] >= first.seconds * 0.5  # the first attempt's training time is counted
    card = export.model_card(locate_adapter(tmp_path / "run"), summary, None)
    assert "| attempts | 2 |" in card and "| steps | 4 |" in card


# --- 9: OpenAI content parts ------------------------------------------------------------------------------

def test_openai_text_content_parts_are_accepted_and_other_parts_refused():
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                     {"type": "text", "text": "there"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]}]}
    assert normalise_record(row, "messages") == [{"role": "user", "content": "Hi\nthere"},
                                                 {"role": "assistant", "content": "Hello!"}]
    image = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                       {"type": "image_url", "image_url": {"url": "x.png"}}]},
                          {"role": "assistant", "content": "A cat."}]}
    with pytest.raises(RowError) as err:
        normalise_record(image, "messages")
    assert err.value.field == "messages[0].content[1]" and "'image_url' content part" in str(err.value)
    assert "only text parts" in str(err.value)


@pytest.mark.slow
def test_gguf_kind_loads_with_the_transformers_gguf_loader(embedded_dir):
    """The verifier's gguf loader (for a GGUF export): the embedded Q4_1 GGUF, read by transformers' GGUF loader
    in the child, answers as the app's base answers (both are the same dequantised weights)."""
    from phi3_lora.config import ModelSettings
    from phi3_lora.embedded import EMBEDDED_NAME, embedded_gguf_path

    engine = ChatEngine(EMBEDDED_NAME, model_settings=ModelSettings(name=EMBEDDED_NAME, load_in_4bit=False,
                                                                    dtype="float32"))
    prompts = [[{"role": "user", "content": "What is your name?"}]]
    ids = [engine.greedy_ids(p, adapter=False, max_new_tokens=12) for p in prompts]
    ref = verify.Reference(prompts, [engine.tokenizer.decode(i, skip_special_tokens=True) for i in ids], ids,
                           engine.stop_ids, 12, "float32", "cpu", None, "probe")
    result = verify.verify_export(embedded_gguf_path(), "gguf", ref)
    print("gguf verification:", result.report())
    assert result.ok and result.identical == 1 and "gguf_file=" in result.loaded
