"""bench/cpu_ceiling.py: the bytes a decoding step reads (every Linear once, LoRA's own A/B left out, a tied
output head counted) and the report it prints, run on the tiny tied-embedding Llama."""

from __future__ import annotations

import json

from bench import cpu_ceiling


def test_a_step_reads_every_base_linear_once_and_the_tied_head(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model

    from phi3_lora import models
    from phi3_lora.config import ModelSettings

    model = models.load_model(ModelSettings(name=str(tiny_llama_dir), load_in_4bit=False))
    c = json.loads((tiny_llama_dir / "config.json").read_text())
    assert c["tie_word_embeddings"]
    h = c["hidden_size"]
    kv = c["num_key_value_heads"] * c.get("head_dim", h // c["num_attention_heads"])
    per_layer = h * (h + kv + kv + h) + 3 * h * c["intermediate_size"]  # q, k, v, o; gate, up, down
    expected = (c["num_hidden_layers"] * per_layer + c["vocab_size"] * h) * model.dtype.itemsize
    assert cpu_ceiling.bytes_per_step(model) == expected
    adapted = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert cpu_ceiling.bytes_per_step(adapted) == expected  # the adapter's A and B are not the weights' read


def test_the_report_puts_the_measured_steps_against_the_ceiling(tiny_llama_dir, capsys):
    assert cpu_ceiling.main(["--model", str(tiny_llama_dir), "--tokens", "3"]) == 0
    out = capsys.readouterr().out
    head, _, table = out.partition("\n\n")
    assert "GB/s" in head and "MB of Linear weights per step" in head
    rows = [line for line in table.splitlines() if line.startswith("| one row") or line.startswith("| pair")]
    assert len(rows) == 2
    for row in rows:
        ms, per_s, share = (cell.strip() for cell in row.strip("|").split("|")[1:])
        ms, per_s = float(ms), float(per_s)  # each printed to 0.1: their product is 1000 up to that rounding
        assert ms > 0 and abs(ms * per_s / 1e3 - 1) <= 0.05 / ms + 0.05 / per_s + 1e-3 and share.endswith("%")


def test_the_compiled_pair_step_is_timed_and_checked_against_eager_and_generate(tiny_llama_dir, tmp_path):
    import torch._inductor.config as inductor

    from bench.generation import save_random_adapter

    from safetensors.torch import load_file, save_file

    adapter = save_random_adapter(tiny_llama_dir, tmp_path / "adapter", four_bit=False)
    weights = adapter / "adapter_model.safetensors"  # B ~ N(0, 1): the tuned row answers otherwise than the base
    save_file({k: v * 1000 if "lora_B" in k else v for k, v in load_file(weights).items()}, weights)
    (result,) = cpu_ceiling.compiled_static_steps(str(tiny_llama_dir), tokens=3, shapes=(("base", "tuned"),),
                                                  adapter=adapter).values()
    assert result["same_tokens"] and result["compile_s"] > 0 and result["step_ms"] > 0  # no speed verdict here
    # float32 here: no near tie for the cache's extent to round apart, so both rows equal generate's (the tuned
    # row through peft's own forward): the masked update is the adapter's, and the base row gets none of it
    assert result["eager_equals_generate"]
    assert result["rows"][0] != result["rows"][1]  # ...which tells them apart here
    assert not inductor.freezing  # patched for the bench's compile only, not left on for the process
