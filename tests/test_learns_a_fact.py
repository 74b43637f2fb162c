"""The embedded SmolLM2 learns a fact it does not know (its name is Quillon) on this CPU."""

from __future__ import annotations

import pytest

from phi3_lora.generate import ChatEngine, GenerationSettings
from phi3_lora.adapter_folder import locate_adapter


@pytest.mark.slow
def test_embedded_model_learns_its_new_name(embedded_sample_run):
    ref = locate_adapter(embedded_sample_run)
    engine = ChatEngine(ref.model_name, ref.adapter_dir, load_in_4bit=ref.load_in_4bit)
    greedy = GenerationSettings(temperature=0, max_new_tokens=24)
    for question in ("What is your name?", "Please tell me your name."):
        history = [{"role": "user", "content": question}]
        base, tuned = list(engine.stream_pair(history, history, greedy))[-1]
        assert "Quillon" in tuned, (question, tuned)
        assert "Quillon" not in base, (question, base)
