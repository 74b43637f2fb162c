"""Bad data through the app: each shared case (tests/bad_cases.py) is uploaded with gradio_client to the upload
endpoint, then validated. The message names the file, the line/row and field and what to do; nothing trains; the
app keeps answering. Plus the one case only the web server can refuse: a file over the upload limit."""

from __future__ import annotations

import html
from pathlib import Path

import pytest
from bad_cases import CASES, GOOD, MAX_LENGTH, Case

from helpers.apps import NO_MAPPING, free_port, start_args, val
from phi3_lora import jobs
from phi3_lora.runs import run_dirs

pytestmark = pytest.mark.slow

UPLOAD_TYPES = (".jsonl", ".json", ".csv", ".parquet")  # the upload widget's file_types
UPLOAD_LIMIT_MB = 60  # above the 50 MB single-line case, so that one reaches our reader


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path):
    from phi3_lora.ui import AppOptions, build_app, launch

    runs = tmp_path_factory.mktemp("runs")
    demo = build_app(options=AppOptions(runs_dir=runs, default_model=str(tiny_llama_dir),
                                        max_file_size=f"{UPLOAD_LIMIT_MB}mb"))
    _, url, _ = launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url, runs, tiny_llama_dir
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False)


def nothing_trained(runs: Path) -> None:
    assert jobs.active_run(runs) is None
    assert not run_dirs(runs), "no run folder may appear"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_upload_is_reported_and_nothing_trains(server, client, tmp_path, case: Case) -> None:
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    url, runs, tiny = server
    path = case.build(tmp_path)
    if path.suffix not in UPLOAD_TYPES:
        # Gradio's File(file_types=...) refuses it at the upload, before our code runs, listing what is accepted.
        with pytest.raises(AppError, match="Invalid file type.*jsonl.*csv.*parquet"):
            client.predict(handle_file(str(path)), api_name="/upload_dataset")
        nothing_trained(runs)
        assert client.predict(api_name="/load_page") is not None
        return
    source = client.predict(handle_file(str(path)), api_name="/upload_dataset")
    assert Path(source).name.endswith(path.name)  # kept under runs/.uploads as <digest>-<name>
    summary, problems, _preview, stats, *_ = client.predict(source, "auto", NO_MAPPING, 0.0, str(tiny), MAX_LENGTH,
                                                            42, api_name="/validate")
    summary = html.unescape(summary)
    if case.kind == "refused":
        assert "p3-error" in summary and path.name in summary, summary
        for word in case.words:
            assert word in summary, (word, summary)
        # Start with this file is refused before any process starts.
        with pytest.raises(AppError) as info:
            client.predict(*start_args(client, **{"Data source": source}), api_name="/start_training")
        assert path.name in str(info.value)
    elif case.kind == "problem":
        assert "p3-ok" in summary and "usable of" in summary, summary
        table = val(problems)["data"]
        row = next((r for r in table if r[1] == case.location and r[2] == case.field), None)
        assert row is not None, table
        assert row[0].endswith(path.name)
        for word in case.words:
            assert word in row[3], (word, row)
    else:
        assert f"{case.rows} usable of" in summary and "p3-error" not in summary, summary
        for word in case.words:
            assert word in summary, (word, summary)
        if case.over_max_length is not None:
            assert f"over max length <b>{case.over_max_length}</b>" in stats, stats
    nothing_trained(runs)
    assert client.predict(api_name="/load_page") is not None  # the app still answers


def test_file_over_the_upload_limit_is_refused_by_size(server, client, tmp_path) -> None:
    import json

    import httpx
    from gradio_client import handle_file

    url, runs, tiny = server
    big = tmp_path / "big.jsonl"
    line = (json.dumps(GOOD) + "\n").encode()
    with open(big, "wb") as f:
        f.write(line * ((UPLOAD_LIMIT_MB + 2) * 2**20 // len(line)))
    with open(big, "rb") as fh:
        response = httpx.post(url.rstrip("/") + "/gradio_api/upload", files={"files": ("big.jsonl", fh)},
                              timeout=60)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert "size" in response.text.lower(), response.text[:300]
    with pytest.raises(Exception, match="(?i)size|413"):
        client.predict(handle_file(str(big)), api_name="/upload_dataset")
    nothing_trained(runs)
    assert not list((runs / ".uploads").glob("*big.jsonl")) if (runs / ".uploads").exists() else True
    assert client.predict(api_name="/load_page") is not None


def test_an_adapter_the_page_never_sends_gets_the_lists_message(server, client) -> None:
    """The Adapter box's value as a client may send it: a number, a name longer than any folder's, a NUL. Each got
    'Something went wrong on the server' (TypeError, OSError 'File name too long', ValueError 'embedded null byte'),
    the scores panel an unhandled error; each is now the list's own message."""
    for value in (12, "x" * 5000, "run\x00id"):
        for endpoint, args in (("export_zip", [value]), ("heldout_example", [value]),
                               ("compare", ["hi", value, 0.7, 0.9, 8, 0, [], [], ""])):
            with pytest.raises(Exception) as refused:
                client.predict(*args, api_name=f"/{endpoint}")
            said = str(refused.value)
            assert "is not a run or checkpoint of this app" in said and "Refresh the list" in said, (endpoint, said)
            assert len(said) < 400, said  # a long name is shortened, not echoed whole
        assert val(client.predict(value, api_name="/eval_results")[0]) == "", value
    # A seed past what torch takes (2**64) was 'Something went wrong' (ValueError); the box now has the training
    # seed's range, which gradio checks before the handler runs.
    with pytest.raises(Exception, match="greater than maximum value 4294967295"):
        client.predict("hi", "no-such-run", 0.7, 0.9, 8, 2**70, [], [], "", api_name="/compare")
    nothing_trained(server[1])
