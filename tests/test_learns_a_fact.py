"""The embedded SmolLM2 learns a fact it does not know (its name is Quillon) on this CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from phi3_lora import config, train
from phi3_lora.generate import ChatEngine, GenerationSettings, locate_adapter

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample_chat.jsonl"


@pytest.mark.slow
def test_embedded_model_learns_its_new_name(tmp_path, embedded_dir):
    cfg = config.preset("quick-cpu").replace(data={"source": str(SAMPLE), "eval_fraction": 0.1},
                                             train={"max_steps": 24, "save_steps": 100})
    result = train.run(cfg, tmp_path / "run")
    assert result.status == "finished" and result.eval_loss is not None

    ref = locate_adapter(tmp_path / "run")
    engine = ChatEngine(ref.model_name, ref.adapter_dir, load_in_4bit=ref.load_in_4bit)
    greedy = GenerationSettings(temperature=0, max_new_tokens=24)
    for question in ("What is your name?", "Please tell me your name."):
        history = [{"role": "user", "content": question}]
        base, tuned = list(engine.stream_pair(history, history, greedy))[-1]
        assert "Quillon" in tuned, (question, tuned)
        assert "Quillon" not in base, (question, base)
