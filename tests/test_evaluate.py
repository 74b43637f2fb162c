"""Base vs tuned scoring on a real (tiny) run: the end-of-run scoring, the CLI, batching, bad input, the card.

The embedded-model tests (the tuned model really answers better) are in test_evaluate_embedded.py.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest

from helpers.training import tiny_config, write_rows
from phi3_lora import cli, events, evaluate, export, train
from phi3_lora.generate import ChatEngine
from phi3_lora.adapter_folder import locate_adapter


def _tiny_run(root: Path, model_dir: Path, **train_overrides) -> Path:
    data = write_rows(root / "rows.jsonl", n=16)
    settings = {"max_steps": 2, "eval_steps": None, "eval_answers": True, "eval_answers_max_new_tokens": 8,
                **train_overrides}
    cfg = tiny_config(model_dir, data, **settings).replace(model={"load_in_4bit": False}, data={"eval_fraction": 0.25})
    result = train.run(cfg, root / "run")
    assert result.status == "finished"
    return root / "run"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_llama_dir) -> Path:
    return _tiny_run(tmp_path_factory.mktemp("eval_run"), tiny_llama_dir)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_a_run_scores_its_held_out_rows_when_it_ends(tiny_run):
    results = evaluate.load_results(tiny_run)
    assert len(results) == 1
    result = results[0]
    held_out = _rows(tiny_run / "eval_rows.jsonl")
    assert len(result["rows"]) == len(held_out) == 4 and result["complete"] and not result["skipped"]
    for row in result["rows"]:
        original = held_out[row["row"] - 1]["messages"]
        assert row["reference"] == original[-1]["content"] and row["history"] == original[:-1]
        assert set(row["scores"]["base"]) == set(row["scores"]["tuned"]) == set(evaluate.scores.TEXT_METRICS)
        assert row["loss"]["tokens"] > 0 and row["loss"]["base"]["nll_sum"] > 0
    changes = [r["change"] for r in result["rows"]]
    assert changes == sorted(changes, reverse=True)
    assert set(result["summary"]) == {m.name for m in evaluate.scores.METRICS}
    # The diary says so, pointing at the same file; the run still reads as finished.
    said = [e for e in events.read_events(tiny_run) if e["type"] == "answer_eval"]
    assert said and Path(said[-1]["file"]) == Path(result["file"])
    assert events.run_status(tiny_run).state == "finished"
    assert evaluate.latest_result(tiny_run, locate_adapter(tiny_run).adapter_dir)["file"] == result["file"]


@pytest.mark.slow
def test_scoring_at_the_end_can_be_switched_off(tmp_path, tiny_llama_dir):
    run = _tiny_run(tmp_path, tiny_llama_dir, eval_answers=False, max_steps=1)
    assert evaluate.load_results(run) == [] and not (run / evaluate.EVAL_DIR).exists()


@pytest.fixture(scope="module")
def engine(tiny_run) -> ChatEngine:
    ref = locate_adapter(tiny_run)
    return ChatEngine(ref.model_name, ref.adapter_dir, load_in_4bit=False)


@pytest.mark.slow
def test_batched_answers_are_the_one_by_one_answers(tiny_run, engine):
    rows = _rows(tiny_run / "eval_rows.jsonl") + [
        {"messages": [{"role": "system", "content": "Answer in one long sentence please."},
                      {"role": "user", "content": "A much longer question than the others, to pad the batch?"},
                      {"role": "assistant", "content": "Yes."}]}]
    speed = evaluate.speed_comparison(engine, rows, batch_size=8, max_new_tokens=8)
    assert speed["rows"] == 5 and speed["identical_answers"] == 5  # left padding changes no answer


class _EndsAfterPromptLength:
    """A StoppingCriteria that ends each row after 1 + (the sum of its prompt's token ids mod 5) tokens: rows of one
    batch end at different steps, decided by their content only (pruning or re-batching cannot change it)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id, self.width = pad_id, None

    def __call__(self, input_ids, scores, **kwargs):
        self.width = self.width or input_ids.shape[1] - 1  # first call: the prompt plus one new token
        prompt = input_ids[:, :self.width]
        return input_ids.shape[1] - self.width >= 1 + (prompt * (prompt != self.pad_id)).sum(-1) % 5


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["auto", "bf16"])  # bf16: a float32 adapter on bf16 weights
def test_rows_that_end_early_leave_the_batch_and_every_answer_stays_the_one_by_one_answer(tiny_run, weights, request,
                                                                                          monkeypatch):
    from phi3_lora.generate import BASE, TUNED, GenerationSettings

    engine = request.getfixturevalue("engine" if weights == "auto" else "engine_bf16")
    if weights == "bf16":  # RowRouting's mixed-dtype path: a float32 adapter (peft's default) on bf16 weights
        import torch
        lora = next(p for n, p in engine.model.named_parameters() if "lora_A" in n)
        assert (engine.model.dtype, lora.dtype) == (torch.bfloat16, torch.float32)

    histories = [r["messages"][:-1] for r in _rows(tiny_run / "eval_rows.jsonl")]
    n, greedy, pad = len(histories), GenerationSettings(max_new_tokens=8), engine.tokenizer.pad_token_id
    inputs = engine._inputs(histories + histories)
    names = [BASE] * n + [TUNED] * n

    def unpruned() -> list[list[int]]:  # transformers' own loop: no row leaves the batch
        with engine.adapter_state(True) as model:
            out = model.generate(**inputs, do_sample=False, max_new_tokens=8, eos_token_id=engine.stop_ids,
                                 pad_token_id=pad, adapter_names=names, stopping_criteria=[_EndsAfterPromptLength(pad)])
        return out[:, inputs["input_ids"].shape[1]:].tolist()

    # The random tiny model repeats one token per side and never says its end token: make the tuned side's token a
    # stop (the tuned rows end at once, as trained answers end early); the criterion ends the base rows at 1-5.
    monkeypatch.setattr(engine, "stop_ids", engine.stop_ids + [unpruned()[-1][0]])
    rows = unpruned()
    ends = [next((i for i, t in enumerate(row) if t in engine.stop_ids), len(row)) for row in rows]
    assert len(set(ends)) >= 3  # rows leave the batch at three or more different steps
    expected = [engine.tokenizer.decode(row[:end], skip_special_tokens=True) for row, end in zip(rows, ends)]
    pairs = engine.answer_pairs(histories, greedy, [_EndsAfterPromptLength(pad)])
    assert [p[0] for p in pairs] + [p[1] for p in pairs] == expected
    one_by_one = [tuple(engine.answer_batch([h], side, greedy, [_EndsAfterPromptLength(pad)])[0]
                        for side in (False, True)) for h in histories]
    assert pairs == one_by_one


def _unquantised_engine(tiny_run, dtype: str) -> ChatEngine:
    from phi3_lora.config import ModelSettings

    ref = locate_adapter(tiny_run)
    return ChatEngine(ref.model_name, ref.adapter_dir,
                      model_settings=ModelSettings(name=ref.model_name, dtype=dtype, load_in_4bit=False))


@pytest.fixture(scope="module")
def engine_fp32(tiny_run) -> ChatEngine:
    """The engine as it runs on a CPU without native bf16 (float32), whatever this machine's CPU."""
    return _unquantised_engine(tiny_run, "float32")


@pytest.fixture(scope="module")
def engine_bf16(tiny_run) -> ChatEngine:
    """The engine as `dtype auto` loads it on a CPU with native bf16 (avx512_bf16)."""
    return _unquantised_engine(tiny_run, "bfloat16")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_cpu_weights_give_the_same_logits_and_answers(tiny_run, dtype, request, monkeypatch):
    import torch

    from phi3_lora import cpu_linear
    from phi3_lora.generate import GenerationSettings

    if getattr(torch, dtype) not in cpu_linear.packable_dtypes():
        pytest.skip("no native bf16 on this CPU: bf16 weights are not packed here")
    engine = request.getfixturevalue(f"engine_{'fp32' if dtype == 'float32' else 'bf16'}")
    histories = [r["messages"][:-1] for r in _rows(tiny_run / "eval_rows.jsonl")]
    inputs = engine._inputs(histories)
    ids = inputs["input_ids"][:, -1:]  # one new token per row: a decoding step's shape
    with engine.adapter_state(True) as model:
        plain = model(input_ids=ids).logits
        packs = cpu_linear.PackedLinears()
        with packs.applied(model):
            packed = model(input_ids=ids).logits
    assert engine.model.dtype == getattr(torch, dtype)
    assert cpu_linear.available(engine.model)
    assert packs._bytes > engine.base.get_output_embeddings().weight.nbytes  # the decoder layers' weights too
    # float32: within rounding; bf16: bit for bit on this project's avx512_bf16 EPYC (the same oneDNN kernels),
    # within a bf16 step anywhere (another ISA may sum in another order)
    close = dict(atol=1e-4, rtol=1e-4) if dtype == "float32" else dict(atol=1e-2, rtol=1.6e-2)
    assert torch.allclose(packed, plain, **close) and torch.equal(packed.argmax(-1), plain.argmax(-1))
    greedy = GenerationSettings(max_new_tokens=8)
    fast = engine.answer_pairs(histories, greedy)
    monkeypatch.setattr(cpu_linear, "PACK_FOR_SPEED", False)
    assert fast == engine.answer_pairs(histories, greedy)


def test_the_automatic_batch_is_as_large_as_the_kv_budget_allows(engine):
    assert evaluate.auto_batch_size(bytes_per_row=100, budget_bytes=1000, rows=50) == 10
    assert evaluate.auto_batch_size(100, 10**9, rows=20) == 20                      # every row in one call
    assert evaluate.auto_batch_size(100, 10**9, rows=500) == evaluate.AUTO_BATCH_CAP
    assert evaluate.auto_batch_size(10**12, 1000, rows=5) == 1                      # never below one
    config = engine.base.config
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # keys and values of every layer, in the model's dtype (float32, or bf16 on a CPU with native bf16)
    width = next(engine.model.parameters()).element_size()
    assert evaluate.kv_bytes_per_token(engine) == config.num_hidden_layers * 2 * kv_heads * head_dim * width
    rows = [{"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": "A."}]}
            for i in range(40)]
    items, _ = evaluate.prepare(rows, engine.tokenizer, evaluate.model_context(engine), 8)
    assert evaluate.engine_batch_size(engine, items, 8) == evaluate.AUTO_BATCH_CAP  # tiny model: the cap


def test_generation_takes_one_cpu_thread_when_the_cores_are_oversubscribed(monkeypatch):
    import torch

    from phi3_lora.threads import THREADS_ENV, cpu_threads, generation_threads

    assert generation_threads(2, 0.3) == 2 and generation_threads(2, 2.9) == 2  # idle, or only our own threads
    assert generation_threads(2, 3.0) == 1 and generation_threads(2, 8.0) == 1  # a training run beside the app
    assert generation_threads(2, 8.0, configured=2) == 2                       # the env var wins
    before = torch.get_num_threads()
    monkeypatch.setenv(THREADS_ENV, "1")
    with cpu_threads(torch.device("cpu")):
        inside = torch.get_num_threads()
    assert inside == 1 and torch.get_num_threads() == before  # the process's own setting comes back
    monkeypatch.delenv(THREADS_ENV)
    monkeypatch.setattr("os.getloadavg", lambda: (50.0, 50.0, 50.0))  # oversubscribed
    with cpu_threads(torch.device("cpu")):
        loaded = torch.get_num_threads()
    with cpu_threads(torch.device("cpu"), steady=True):  # scores: the same count whatever the load
        steady = torch.get_num_threads()
    assert loaded == 1 and steady == min(before, len(os.sched_getaffinity(0)))


@pytest.mark.slow
def test_tuned_answers_merged_for_speed_are_the_unmerged_ones_and_the_base_stays_exact(tiny_run, engine,
                                                                                      monkeypatch):
    import torch

    from phi3_lora import generate, merging

    histories = [r["messages"][:-1] for r in _rows(tiny_run / "eval_rows.jsonl")]
    base_weights = {n: p.detach().clone() for n, p in engine.model.named_parameters() if "base_layer" in n}
    assert base_weights and merging.mergeable_layers(engine.model)  # plain LoRA on float Linear layers: the tuned side runs merged
    ids = torch.tensor([engine.prompt_ids(histories[0])])

    def logits(on: bool, merged: bool) -> torch.Tensor:
        with engine.adapter_state(on, merged=merged) as model:
            return model(input_ids=ids).logits[0]

    base, tuned, merged = logits(False, False), logits(True, False), logits(True, True)
    # float rounding, not the adapter: float32's, or bf16's (8 bits of mantissa) on a CPU with native bf16
    rounding = 1e-3 if merged.dtype == torch.float32 else 2e-2
    assert (merged - tuned).abs().max() < rounding * (tuned - base).abs().max()
    assert torch.equal(merged.argmax(-1), tuned.argmax(-1))
    greedy = generate.GenerationSettings(max_new_tokens=8)  # one row per call: the calls that run merged
    fast = [engine.answer_batch([h], True, greedy)[0] for h in histories] + [engine.answer(histories[0], True, greedy)]
    monkeypatch.setattr(merging, "MERGE_FOR_SPEED", False)
    assert fast == [engine.answer_batch([h], True, greedy)[0] for h in histories] + [
        engine.answer(histories[0], True, greedy)]
    with pytest.raises(RuntimeError), engine.adapter_state(True, merged=True):
        raise RuntimeError("generation failed mid-way")
    # The base's own tensors are back, bit for bit (peft's unmerge would leave rounding), adapter layers on again.
    assert all(torch.equal(p, base_weights[n]) for n, p in engine.model.named_parameters() if "base_layer" in n)
    assert torch.equal(logits(True, False), tuned) and torch.equal(logits(False, False), base)


@pytest.mark.slow
def test_the_time_limit_leaves_rows_out_and_says_so(tiny_run, engine):
    rows = _rows(tiny_run / "eval_rows.jsonl")
    result = evaluate.evaluate(engine, rows, evaluate.EvalOptions(max_new_tokens=8, max_seconds=1e-6))
    assert result["rows"] == [] and result["not_reached"] == 4 and not result["complete"]
    assert "4 not reached (time limit)" in evaluate.coverage_line(result)
    stopped = evaluate.evaluate(engine, rows, evaluate.EvalOptions(max_new_tokens=8), should_stop=lambda: True)
    assert stopped["not_reached"] == 4 and stopped["stopped_by"] == "stop"


@pytest.mark.slow
def test_cli_and_model_card_show_the_numbers_of_the_saved_json(tiny_run, tmp_path, capsys):
    assert cli.main(["evaluate", "--adapter", str(tiny_run), "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    saved = Path(out.strip().splitlines()[-1].removeprefix("saved: "))
    result = json.loads(saved.read_text())
    assert evaluate.summary_markdown(result) in out
    assert evaluate.load_results(tiny_run)[-1]["file"] == str(saved)  # the newest result is the CLI's
    bundle = export.adapter_zip(tiny_run, tmp_path / "out", verify=False)  # the card's scores, not the zip's check
    with zipfile.ZipFile(bundle) as zf:
        card = zf.read(next(n for n in zf.namelist() if n.endswith("README.md"))).decode()
    assert evaluate.summary_markdown(result) in card and saved.name in card


@pytest.mark.slow
def test_bad_rows_are_named_and_the_rest_is_scored(tiny_run, tmp_path, capsys):
    good = {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Quillon."}]}
    no_answer = {"messages": [{"role": "user", "content": "Hello?"}]}
    too_long = {"messages": [{"role": "user", "content": "word " * 700}, {"role": "assistant", "content": "ok"}]}
    data = tmp_path / "mixed.jsonl"
    again = {"messages": [{"role": "user", "content": "Your name?"}, {"role": "assistant", "content": "Quillon."}]}
    data.write_text("".join(json.dumps(r) + "\n" for r in (good, no_answer, too_long, again)))
    out_dir = tmp_path / "scores"
    assert cli.main(["evaluate", "--adapter", str(tiny_run), "--data", str(data), "--max-new-tokens", "8",
                     "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "skipped line 2" in out and "no assistant turn" in out
    assert "more than the model's context of 512" in out
    result = evaluate.load_results(out_dir)[-1]
    assert len(result["rows"]) == 2 and {r["reference"] for r in result["rows"]} == {"Quillon."}
    assert len(result["skipped"]) == 2


@pytest.mark.slow
def test_a_file_without_any_reference_is_refused_clearly(tiny_run, tmp_path, capsys):
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Q{i}?"}]}) + "\n"
                            for i in range(3)))
    assert cli.main(["evaluate", "--adapter", str(tiny_run), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "None of the 3 rows" in err and "no assistant turn" in err


@pytest.mark.slow
def test_an_empty_eval_split_says_what_to_do(tiny_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    (run / "eval_rows.jsonl").write_text("")
    assert cli.main(["evaluate", "--adapter", str(run)]) == 2
    err = capsys.readouterr().err
    assert "no held-out rows" in err and "--data FILE" in err
