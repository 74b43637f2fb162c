"""The app through its HTTP API (gradio_client), launched on a free port with a tiny model.

One module-scoped server: upload -> validate -> start -> a second Start is refused -> a new session
re-attaches to the run -> poll to the end -> compare (base != tuned) -> export zip loads with peft.
"""

from __future__ import annotations

import re
import time
import zipfile
from pathlib import Path

import pytest

from helpers.apps import NO_MAPPING, SAMPLE, client, served_app, start_args, val
from phi3_lora import events, jobs
from phi3_lora.runs import RunDir

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path):
    runs = tmp_path_factory.mktemp("runs")
    with served_app(runs, tiny_llama_dir) as (url, _):
        yield url, runs, tiny_llama_dir


def test_validate_upload(server) -> None:
    from gradio_client import handle_file

    url, runs, tiny = server
    c = client(url)
    source = c.predict(handle_file(str(SAMPLE)), api_name="/upload_dataset")
    # kept next to the runs, and named by the form as this session's upload: no folder of the server
    assert source.startswith("upload:") and source.endswith("-sample_chat.jsonl") and "/" not in source
    assert len(list((runs / ".uploads" / "sessions").glob(f"*/{source.split(':', 1)[1]}"))) == 1
    out = c.predict(source, "auto", NO_MAPPING, 0.1, str(tiny), 256, 42, api_name="/validate")
    summary, problems, preview, stats, _plot, _example, tokens, mapping = out
    assert "format messages" in summary and "48 usable of 48 rows" in summary and "5 eval" in summary
    assert len(preview["data"]) == 48
    assert "p3-trained" in tokens and "p3-masked" in tokens and "Quillon" in tokens
    assert "longest" in stats


def test_validate_reports_bad_rows(server, tmp_path: Path) -> None:
    url, runs, tiny = server
    bad = tmp_path / "bad.jsonl"
    good = SAMPLE.read_text().splitlines()[:4]
    bad.write_text("\n".join(good[:2] + ['{"messages": [{"role": "user", "content": "hi"}]}', "{oops"] + good[2:]))
    out = client(url).predict(str(bad), "auto", NO_MAPPING, 0.0, str(tiny), 256, 42, api_name="/validate")
    problems = out[1].get("value", out[1])["data"]  # an update (value + visible) or a bare table
    assert {row[1] for row in problems} == {"line 3", "line 4"}


def test_show_config_gives_yaml_and_cli(server) -> None:
    url, runs, tiny = server
    c = client(url)
    args = start_args(c, **{"Data source": str(SAMPLE), "Max steps": 7})
    yaml_text, cli = (v.get("value") for v in c.predict(*args, api_name="/show_config"))
    assert "max_steps: 7" in yaml_text and str(tiny) in yaml_text
    assert "python -m phi3_lora train --config run.yaml" in cli and "--train.max_steps 7" in cli


def test_bad_setting_is_a_readable_error(server) -> None:
    from gradio_client.exceptions import AppError

    url, runs, tiny = server
    c = client(url)
    # the widget's range is the check's (0, 1): the field refuses 3.0 itself, naming the bound
    with pytest.raises(AppError, match="3.0 is greater than maximum value 1"):
        c.predict(*start_args(c, **{"Data source": str(SAMPLE), "Learning rate": 3.0}), api_name="/start_training")
    # inside the widget's range but outside the check (the exclusive end): the config's own message
    with pytest.raises(AppError, match="train.learning_rate must be above 0 and below 1"):
        c.predict(*start_args(c, **{"Data source": str(SAMPLE), "Learning rate": 1.0}), api_name="/start_training")


def test_train_refuse_second_reattach_compare_export(server) -> None:
    from gradio_client.exceptions import AppError

    url, runs, tiny = server
    c = client(url)
    args = start_args(c, **{"Data source": str(SAMPLE), "Max steps": 8, "Checkpoint every N steps": 4,
                            "Learning rate": 1e-2, "Batch size": 4, "Max length (tokens)": 128,
                            "Eval every N steps": 4})
    t0 = time.time()
    first = c.predict(*args, api_name="/start_training")
    run_id = val(first[0])
    assert run_id and RunDir(runs / run_id).exists()

    # One job per machine: a second Start says what is running.
    with pytest.raises(AppError, match=re.escape(run_id)) as refused:
        client(url).predict(*args, api_name="/start_training")
    assert "already going" in str(refused.value)

    # A fresh session (a reload, another browser) lands on the same run.
    loaded = client(url).predict(api_name="/load_page")
    assert val(loaded[0]) == run_id

    first_loss = None
    deadline = time.time() + 300
    while time.time() < deadline:
        st = events.run_status(runs / run_id)
        if first_loss is None and st.losses:
            first_loss = time.time() - t0
        if not st.active and st.state != "queued":
            break
        time.sleep(0.5)
    assert st.state == "finished", st.reason
    print(f"\n[timing] Start -> first loss point (tiny model): {first_loss:.1f} s; whole run {time.time() - t0:.1f} s")
    status_html = c.predict(run_id, "", api_name="/poll_run")[1]
    assert "finished" in status_html

    assert val(c.predict(None, api_name="/list_adapters")) == run_id
    base_chat, tuned_chat, prompt_left, status, _reference = c.predict(
        "What is your name?", run_id, 0.0, 0.9, 24, 0, [], [], api_name="/compare")
    base, tuned = base_chat[-1]["content"], tuned_chat[-1]["content"]
    base, tuned = (b if isinstance(b, str) else b[0]["text"] for b in (base, tuned))
    assert base_chat[0]["role"] == "user" and base != tuned, (base, tuned)
    assert "done" in status

    prompt, reference, system, base_chat, tuned_chat, _ = c.predict(run_id, api_name="/heldout_example")
    assert prompt and "Reference answer" in val(reference)
    # The reference stays for its own context (the row's system prompt and earlier turns, as the example filled them
    # in) and goes for any other (the session remembers which was held out).
    assert c.predict(prompt, run_id, 0.0, 0.9, 8, 0, base_chat, tuned_chat, system,
                     api_name="/compare")[4] == {"__type__": "update"}
    hidden = c.predict("Something else?", run_id, 0.0, 0.9, 8, 0, [], [], api_name="/compare")[4]
    assert hidden.get("visible") is False

    zip_path, zip_status = c.predict(run_id, api_name="/export_zip")
    assert "verified: " in zip_status and "answers identical" in zip_status, zip_status  # the fresh-process check
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
        assert any(n.endswith("adapter_model.safetensors") for n in names)
        out = Path(zip_path).parent / "unzipped"
        zf.extractall(out)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = Path(next(n for n in names if n.endswith("adapter_config.json"))).parent
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), out / folder)
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_stop_keeps_checkpoint_and_resume_continues(server) -> None:
    url, runs, tiny = server
    c = client(url)
    args = start_args(c, **{"Data source": str(SAMPLE), "Max steps": 400, "Checkpoint every N steps": 2,
                            "Max length (tokens)": 128})
    run_id = val(c.predict(*args, api_name="/start_training")[0])
    deadline = time.time() + 180
    while time.time() < deadline and events.run_status(runs / run_id).step < 3:
        time.sleep(0.5)
    out = c.predict(run_id, api_name="/stop_training")
    st = events.run_status(runs / run_id)
    assert st.state == "stopped" and st.last_checkpoint, st
    assert "stopped" in out[1]
    c.predict(run_id, api_name="/resume_training")
    assert jobs.active_run(runs) == run_id
    jobs.stop_run(run_id, runs, grace=10)
