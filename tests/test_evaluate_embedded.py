"""After a short run on the sample data the embedded SmolLM2's answers score better than the base's, and the
CLI and the model card show the numbers of the saved JSON (the app: test_browser_evaluate.py)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from phi3_lora import cli, evaluate, export

pytestmark = pytest.mark.slow


def test_the_tuned_model_answers_the_held_out_rows_better(embedded_sample_run):
    result = evaluate.load_results(embedded_sample_run)[0]  # scored by the run itself when it ended
    held_out = [line for line in (embedded_sample_run / "eval_rows.jsonl").read_text().splitlines() if line.strip()]
    assert len(result["rows"]) == len(held_out) >= 4 and result["complete"]
    s = result["summary"]
    assert s["rougeL"]["tuned"] > s["rougeL"]["base"], s["rougeL"]
    assert s["chrf"]["tuned"] > s["chrf"]["base"], s["chrf"]
    assert s["loss"]["tuned"] < s["loss"]["base"], s["loss"]
    assert s["perplexity"]["tuned"] < s["perplexity"]["base"]


def test_cli_and_model_card_show_the_saved_numbers(embedded_sample_run, tmp_path, capsys):
    from conftest import EMBEDDED_EVAL_TOKENS

    assert cli.main(["evaluate", "--adapter", str(embedded_sample_run), "--rows", "0",
                     "--max-new-tokens", str(EMBEDDED_EVAL_TOKENS)]) == 0
    out = capsys.readouterr().out
    saved = Path(out.strip().splitlines()[-1].removeprefix("saved: "))
    result = json.loads(saved.read_text())
    table = evaluate.summary_markdown(result)
    assert table in out
    # Greedy and the same batches: the CLI reproduces the run's own end-of-run scores exactly.
    assert table == evaluate.summary_markdown(evaluate.load_results(embedded_sample_run)[0])
    # verify=False: this test is about the card's scores (the zip's own fresh-process check: test_faithful_export)
    with zipfile.ZipFile(export.adapter_zip(embedded_sample_run, tmp_path, verify=False)) as zf:
        card = zf.read(next(n for n in zf.namelist() if n.endswith("README.md"))).decode()
    assert table in card and saved.name in card
