"""Real training runs on tiny models: QLoRA train -> save -> reload -> generate, and the guards."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from helpers.training import tiny_config, write_rows
from phi3_lora import events, train
from phi3_lora.errors import UserError
from phi3_lora.generate import ChatEngine, GenerationSettings
from phi3_lora.adapter_folder import locate_adapter
from phi3_lora.runs import RunDir
from phi3_lora.trainer import log_line


@pytest.mark.slow
def test_qlora_train_save_reload_generate_on_tiny_phi3(tmp_path, tiny_phi3_dir):
    cfg = tiny_config(tiny_phi3_dir, write_rows(tmp_path / "d.jsonl"))
    result = train.run(cfg, tmp_path / "run")
    assert result.status == "finished" and result.steps == 6

    adapter = RunDir(tmp_path / "run").adapter
    files = {p.name for p in adapter.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "chat_template.jinja", "run_summary.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files), files
    weights = load_file(adapter / "adapter_model.safetensors")
    assert any("qkv_proj.lora_A" in k for k in weights) and any("gate_up_proj.lora_B" in k for k in weights)
    assert any(float(w.abs().sum()) > 0 for k, w in weights.items() if "lora_B" in k), "lora_B never moved"

    st = events.run_status(tmp_path / "run")
    assert st.state == "finished" and len(st.losses) == 6
    assert [step for step, _ in st.eval_losses] == [3, 6]  # the final eval reuses step 6's, not a repeat
    first = next(e for e in events.read_events(tmp_path / "run") if e["type"] == "log")
    assert log_line(first).startswith("step 1/6  loss ") and "tok/s" in log_line(first)
    assert st.losses[-1][1] < st.losses[0][1], st.losses  # it learned the one answer
    assert [step for step, _ in RunDir(tmp_path / "run").checkpoint_dirs()] == [3, 6]

    ref = locate_adapter(tmp_path / "run")
    assert ref.model_name == str(tiny_phi3_dir) and ref.load_in_4bit
    engine = ChatEngine(ref.model_name, ref.adapter_dir, load_in_4bit=True)
    greedy = GenerationSettings(temperature=0, max_new_tokens=8)
    history = [{"role": "user", "content": "Question 99: who are you?"}]
    base, tuned = list(engine.stream_pair(history, history, greedy))[-1]
    assert tuned != base
    # Adapter off equals the base side of the pair, adapter on equals the tuned side: one copy of the weights.
    assert engine.answer(history, adapter=False, settings=greedy) == base
    assert engine.answer(history, adapter=True, settings=greedy) == tuned


@pytest.mark.slow
def test_16bit_lora_on_tiny_llama_writes_events_with_throughput(tmp_path, tiny_llama_dir):
    cfg = tiny_config(tiny_llama_dir, write_rows(tmp_path / "d.jsonl"), max_steps=3, eval_steps=None)
    cfg = cfg.replace(model={"load_in_4bit": False}, lora={"target_modules": ["q_proj", "v_proj"]})
    train.run(cfg, tmp_path / "run")
    evs = events.read_events(tmp_path / "run")
    start = next(e for e in evs if e["type"] == "start")
    assert start["trainable_params"] > 0 and start["device"] == "cpu" and start["max_steps"] == 3
    logs = [e for e in evs if e["type"] == "log"]
    assert len(logs) == 3 and all(e["tokens_per_second"] and e["tokens_per_second"] > 0 for e in logs[1:])
    assert evs[-1]["type"] == "end" and evs[-1]["status"] == "finished"
    weights = load_file(RunDir(tmp_path / "run").adapter / "adapter_model.safetensors")
    assert any("q_proj" in k for k in weights) and not any("o_proj" in k for k in weights)


def test_refuses_when_no_token_would_be_trained(tmp_path, tiny_phi3_dir):
    long_user = "word " * 200  # the assistant turn starts past max_length in every row
    rows = [{"messages": [{"role": "user", "content": long_user + str(i)},
                          {"role": "assistant", "content": "ok"}]} for i in range(8)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(tiny_phi3_dir, data, max_length=32)
    with pytest.raises(UserError, match="No token would be trained"):
        train.run(cfg, tmp_path / "run")
    st = events.run_status(tmp_path / "run")
    assert st.state == "failed" and "max_length" in st.reason


def test_bad_data_fails_the_run_with_the_data_message(tmp_path, tiny_phi3_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')  # no assistant turn anywhere
    with pytest.raises(UserError):
        train.run(tiny_config(tiny_phi3_dir, data), tmp_path / "run")
    assert events.run_status(tmp_path / "run").state == "failed"


@pytest.mark.slow
def test_a_stop_after_the_last_step_says_so_and_resume_finishes(tmp_path, tiny_phi3_dir, monkeypatch):
    # Stop lands after the training loop (final checkpoint saved) but before the adapter is written: the run said
    # "stopped before training began". Resume in the same process must then finish it (the stop is per run).
    cfg = tiny_config(tiny_phi3_dir, write_rows(tmp_path / "d.jsonl"))
    save = train.save_adapter_atomic

    def stopped_while_saving(*args, **kwargs):
        import os
        import signal

        os.kill(os.getpid(), signal.SIGTERM)  # as the app's Stop does; the handler raises at the next bytecode
        return save(*args, **kwargs)

    monkeypatch.setattr(train, "save_adapter_atomic", stopped_while_saving)
    result = train.run(cfg, tmp_path / "run")
    assert result.status == "stopped" and result.steps == 6
    end = [e for e in events.read_events(tmp_path / "run") if e["type"] == "end"][-1]
    assert "after its last step (6)" in end["reason"] and "press Resume" in end["reason"], end
    run = RunDir(tmp_path / "run")
    assert not run.adapter.exists() and run.last_checkpoint().name == "checkpoint-6"

    monkeypatch.setattr(train, "save_adapter_atomic", save)
    resumed = train.run(cfg, tmp_path / "run", resume=True)
    assert resumed.status == "finished" and resumed.steps == 6  # not a 7th step past max_steps
    final = load_file(run.adapter / "adapter_model.safetensors")
    trained = load_file(run.last_checkpoint() / "adapter_model.safetensors")
    assert final.keys() == trained.keys() and all(bool((final[k] == trained[k]).all()) for k in final)
    assert events.run_status(tmp_path / "run").state == "finished"
