"""Issue 16's walk through the HTTP API: nothing forgotten (clearing the upload clears the source), nothing
stale (the preset radio, the time estimate), nothing noisy (the log tail, the upload's hashed name)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from helpers.apps import NO_MAPPING, SAMPLE, client, endpoint_args, served_app, val
from phi3_lora import config as cfgmod
from phi3_lora import evaluate, events, jobs, steptime
from phi3_lora.runs import RunDir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path):
    runs = tmp_path_factory.mktemp("walk_runs")
    with served_app(runs, tiny_llama_dir) as (url, _):
        yield url, runs, tiny_llama_dir


def test_the_upload_shows_its_own_name_and_its_x_clears_the_source(server) -> None:
    from gradio_client import handle_file

    url, runs, tiny = server
    c = client(url)
    source = c.predict(handle_file(str(SAMPLE)), api_name="/upload_dataset")
    summary = c.predict(source, "auto", NO_MAPPING, 0.1, str(tiny), 256, 42, api_name="/validate")[0]
    assert Path(source).name != "sample_chat.jsonl" and ">sample_chat.jsonl: format messages" in summary
    cleared, note, preview, problems, stats, histogram, tokens = c.predict(source, api_name="/clear_upload")
    assert cleared == "" and "No data yet" in note
    # Nothing of the file stays on show: its rows, problems, token stats, histogram and trained tokens.
    assert not val(preview)["data"] and not (val(problems) or {}).get("data") and problems.get("visible") is False
    assert stats == "" and histogram is None and tokens == ""
    # A source chosen after the upload (the sample, a Hub id) is not the upload's to clear.
    assert c.predict(str(SAMPLE), api_name="/clear_upload")[0] == {"__type__": "update"}  # left as it is


def test_an_uploads_problems_name_the_users_file_not_its_stored_copy(server, tmp_path) -> None:
    """The stored copy is <hash>-name; what the user reads (summary, toast, problems table) names their file."""
    from gradio_client import handle_file

    url, _, tiny = server
    c = client(url)
    wrong = tmp_path / "questions.csv"
    wrong.write_text("question,answer\nWhat?,That.\nWho?,Them.\n")
    source = c.predict(handle_file(str(wrong)), api_name="/upload_dataset")
    stored = source.removeprefix("upload:")
    assert stored != "questions.csv"
    summary = c.predict(source, "auto", NO_MAPPING, 0.1, str(tiny), 256, 42, api_name="/validate")[0]
    assert "questions.csv: Could not tell the data format" in summary and stored not in summary
    # A file with one bad row: the problems table and the warnings name it as the user did.
    bad = tmp_path / "chats.jsonl"
    good = '{"messages": [{"role": "user", "content": "hi %d"}, {"role": "assistant", "content": "hello"}]}'
    bad.write_text("\n".join([good % i for i in range(4)] + ['{"messages": []}']) + "\n")
    source = c.predict(handle_file(str(bad)), api_name="/upload_dataset")
    summary, problems = c.predict(source, "auto", NO_MAPPING, 0.1, str(tiny), 256, 42, api_name="/validate")[:2]
    stored = source.removeprefix("upload:")
    rows = val(problems)["data"]
    assert ">chats.jsonl: format messages" in summary and stored not in summary
    assert rows and all(row[0] == "chats.jsonl" and stored not in row[3] for row in rows), rows


def test_each_download_is_named_by_its_run(server) -> None:
    """The adapter, merged and GGUF downloads of a run carry its id: the GGUF's was gguf-f16-download.zip for every
    run, so a second run's download landed as 'gguf-f16-download (1).zip'."""
    from helpers.run_folders import make_adapter_run

    url, runs, tiny = server
    run_id = "20260102-000000-named-downloads"
    make_adapter_run(runs, tiny, run_id)
    c = client(url)
    zipped = c.predict(run_id, api_name="/export_zip")[0]
    merged = val(c.predict(*endpoint_args(c, "export_merged", Adapter=run_id), api_name="/export_merged")[1])
    gguf = val(c.predict(*endpoint_args(c, "export_gguf", Adapter=run_id, Type="f16"), api_name="/export_gguf")[1])
    names = [Path(f).name for f in (zipped, merged, gguf)]
    assert names == [f"{run_id}-adapter.zip", f"{run_id}-merged.zip", f"{run_id}-gguf-f16.zip"], names


def test_two_runs_merged_and_gguf_downloads_unpack_side_by_side(server) -> None:
    """Every run's merged-model zip unpacked to merged/ (and every GGUF zip to gguf-f16/): a second run's, extracted
    beside the first's, went into (and over) the same folder. Each now unpacks to one folder named by its run, like
    its zip, and the GGUF's README runs its commands in that folder, whatever it is called."""
    import zipfile

    from helpers.run_folders import make_adapter_run

    url, runs, tiny = server
    c = client(url)
    tops = {}
    for run_id in ("20260103-000000-first-merge", "20260103-000001-second-merge"):
        make_adapter_run(runs, tiny, run_id)
        merged = val(c.predict(*endpoint_args(c, "export_merged", Adapter=run_id), api_name="/export_merged")[1])
        with zipfile.ZipFile(merged) as zf:
            names = zf.namelist()
        assert any(n.endswith("/model.safetensors") for n in names), names
        tops[run_id] = {n.split("/", 1)[0] for n in names}
    first, second = tops.values()
    assert first != second, tops
    assert tops == {run_id: {f"{run_id}-merged"} for run_id in tops}, tops
    run_id = next(iter(tops))
    gguf = val(c.predict(*endpoint_args(c, "export_gguf", Adapter=run_id, Type="f16"), api_name="/export_gguf")[1])
    with zipfile.ZipFile(gguf) as zf:
        names = zf.namelist()
        readme = zf.read(f"{run_id}-gguf-f16/README.md").decode()
    assert {n.split("/", 1)[0] for n in names} == {f"{run_id}-gguf-f16"}, names
    assert "Modelfile" in {n.split("/", 1)[1] for n in names} and "cd " not in readme, (names, readme)


def test_an_edit_turns_the_preset_radio_to_custom(server) -> None:
    url, _, _ = server
    c = client(url)
    estimate, custom = c.predict(*endpoint_args(c, "/estimate", Preset="quick-cpu", **{"Learning rate": 0.005}),
                                 api_name="/estimate")
    assert val(custom) == "custom" and "Trainable parameters" in estimate
    # Unedited, the form's own defaults (as the page sends them) keep their preset; so does each preset's values.
    defaults = endpoint_args(c, "/estimate")
    preset_at_load = defaults[-1]
    assert preset_at_load != "custom"
    _, kept = c.predict(*defaults, api_name="/estimate")
    assert kept == {"__type__": "update"}, kept  # skip: the radio keeps preset_at_load
    # (it read "custom" because the page opened with embed_tokens checked: Start trained an embedding LoRA)
    assert yaml_of(c, endpoint_args(c, "/show_config"))["lora"]["target_modules"] == "all-linear"
    for name in ("cookbook", "quick-cpu"):
        applied = c.predict(name, *defaults[:-1], api_name="/apply_preset")[:-1]
        _, kept = c.predict(*[a["value"] if isinstance(a, dict) and "value" in a else a for a in applied], name,
                            api_name="/estimate")
        assert kept == {"__type__": "update"}, (name, kept)
    assert "<b>" not in estimate.replace("<b>", "", estimate.count("<b>")) and "&lt;b&gt;" not in estimate


def test_the_time_estimate_is_steps_times_the_step_time_measured_here(server) -> None:
    url, runs, tiny = server
    c = client(url)
    args = endpoint_args(c, "/time_estimate", **{"Max steps": 40})
    text, _ = c.predict(*args, api_name="/time_estimate")
    assert "not measured yet" in text
    config = cfgmod.from_dict(yaml_of(c, args))
    steptime.record(runs, config, 1.5, "3 timed steps")
    text, preset = c.predict(*args, api_name="/time_estimate")
    assert "about 1 min 00 s for 40 steps × 1.50 s per step (3 timed steps" in text


def yaml_of(c: Any, args: list[Any]) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(c.predict(*args, api_name="/show_config")[0]["value"])


def test_overlay_draws_the_chosen_runs_and_refuses_unknown_ones(server) -> None:
    from gradio_client.exceptions import AppError

    url, runs, _ = server
    for run_id, scale in (("20260101-000000-a", 1.0), ("20260101-000001-b", 2.0)):
        run = runs / run_id
        run.mkdir()
        cfgmod.save_yaml(cfgmod.RunConfig(), RunDir(run).config)
        events.append_event(run, "start", step=0, max_steps=2)
        for step in (1, 2):
            events.append_event(run, "log", step=step, max_steps=2, loss=scale * step)
        events.append_event(run, "eval", step=2, max_steps=2, eval_loss=scale)
        events.append_event(run, "end", status="finished", step=2)
    summary = {m: {"base": 10.0, "tuned": 42.5, "diff": 32.5, "ci_low": 1.0, "ci_high": 50.0}
               for m in ("rougeL", "chrf", "bleu")} | {"loss": {"base": 4.9, "tuned": 0.61, "diff": -4.29,
                                                                 "ci_low": -5.0, "ci_high": -3.0}}
    evaluate.save_result({"version": evaluate.FORMAT_VERSION, "created": "2026-01-01T00:00:09+0000",
                          "summary": summary, "rows": [{}] * 3}, runs / "20260101-000000-a")
    c = client(url)
    choices = val(c.predict([], api_name="/overlay_choices"))
    assert choices is None or choices == []  # nothing chosen yet; the choices come with the update
    figure, table = c.predict(["20260101-000000-a", "20260101-000001-b"], api_name="/overlay_runs")
    assert figure
    # the scores of the evaluated run sit beside the curves; the other says it was not evaluated
    assert "| 20260101-000000-a | 3 | 10.0 → 42.5 | 10.0 → 42.5 | 10.0 → 42.5 | 4.900 → 0.610 |" in table
    assert "| 20260101-000001-b | - | not evaluated |" in table
    with pytest.raises(AppError, match="no run called|not in the list of choices"):
        c.predict(["../etc"], api_name="/overlay_runs")


def test_the_overlay_figure_has_a_train_and_an_eval_curve_per_run() -> None:
    from phi3_lora.ui.train_tab import overlay_figure

    a = events.RunStatus(state="finished", losses=[(1, 2.0), (2, 1.0)], eval_losses=[(2, 1.5)])
    b = events.RunStatus(state="finished", losses=[(1, 3.0)])
    fig = overlay_figure({"run-a": a, "run-b": b})
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["run-a train", "run-a eval", "run-b train"]


def test_step_ticks_are_whole_numbers_even_for_one_point() -> None:
    from phi3_lora.ui.dataset import histogram_figure
    from phi3_lora.ui.train_tab import loss_figure

    fig = loss_figure(events.RunStatus(state="running", losses=[(1, 2.0)]))
    fig.canvas.draw()
    assert all(float(t.get_text()).is_integer() for t in fig.axes[0].get_xticklabels() if t.get_text())
    fig = histogram_figure([10, 20, 30], 64)
    fig.canvas.draw()
    assert all(float(t.get_text()).is_integer() for t in fig.axes[0].get_yticklabels() if t.get_text())


def test_the_log_tail_is_the_runs_own_lines(tmp_path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    cfgmod.save_yaml(cfgmod.RunConfig(), RunDir(run).config)
    (run / RunDir.LOG).write_text(
        "Filter:   0%|          | 0/43 [00:00<?, ? examples/s]\rFilter: 100%|██████████| 43/43 [00:00<00:00, "
        "611.30 examples/s]\nLoading weights: 100%|██████████| 20/20 [00:00<00:00, 1482.32it/s]\n"
        "step 1/4  loss 10.8438  lr 0.00e+00  29 tok/s  eta 24 s\nstep 4/4  eval loss 10.8522\n")
    assert jobs.log_tail("r", tmp_path) == "step 1/4  loss 10.8438  lr 0.00e+00  29 tok/s  eta 24 s\n" \
                                           "step 4/4  eval loss 10.8522"
