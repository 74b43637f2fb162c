"""Exposure: what the web server hands out, what we unpickle, and who may train.

- Gradio's file routes serve uploads and our exports only: the runs folder (configs, events, checkpoints, kept
  uploads, dotfiles), system files and traversal tricks (encoded, double-encoded, backslash, case) are refused.
- Weights load from safetensors only: no torch.load / pickle / remote model code / shell command lines in our code, and an
  adapter folder holding only adapter_model.bin is refused with a clear message.
- --auth gates the API: without credentials a client gets nothing; with them it can start a run.
(The Space login gate is tested in tests/test_spaces.py.)
"""

from __future__ import annotations

import http.client
import json
import os
import re
from pathlib import Path
from urllib.parse import quote, urlparse

import pytest

from helpers.run_folders import RUN_ID, make_adapter_run
from helpers.apps import SAMPLE, free_port, raw_call, start_args, val
from phi3_lora import jobs
from phi3_lora.errors import UserError
from phi3_lora.runs import ACTIVE, ProcessRecord, RunDir, run_dirs, write_active

ROOT = Path(__file__).resolve().parents[1]
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path):
    from phi3_lora.ui import build_app, launch

    runs = tmp_path_factory.mktemp("runs")
    make_adapter_run(runs, tiny_llama_dir)
    (runs / ".uploads").mkdir()
    (runs / ".uploads" / "abc-kept.jsonl").write_text("{}\n")
    write_active(runs, RUN_ID, ProcessRecord.of(1))
    demo = build_app(runs, default_model=str(tiny_llama_dir))
    _, url, _ = launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url, runs
    demo.close()


def get(url: str, raw_path: str) -> tuple[int, bytes]:
    """GET with the path sent byte for byte (no client-side normalising of .. or %-escapes)."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request("GET", raw_path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.mark.slow
def test_only_uploads_and_exports_are_downloadable(server) -> None:
    import httpx

    from phi3_lora.runs import exports_dir

    url, runs = server
    run = runs / RUN_ID

    # Allowed: a file the user uploaded, and the app's own export, by the URL the answer gives: a copy in gradio's
    # cache, which names no folder of this server.
    upload = httpx.post(url.rstrip("/") + "/gradio_api/upload", files={"files": ("mine.jsonl", b'{"a": 1}\n')})
    uploaded = upload.json()[0]
    assert get(url, "/gradio_api/file=" + quote(uploaded)) == (200, b'{"a": 1}\n')
    said, (download, _) = raw_call(url, "export_zip", [RUN_ID])
    for folder in (str(runs), str(runs.parent), str(ROOT)):
        assert folder not in said, (folder, said[:800])
    status, body = get(url, urlparse(download["url"]).path)
    assert status == 200 and body[:2] == b"PK"
    built = exports_dir(runs, RUN_ID) / f"{RUN_ID}-adapter.zip"
    assert built.exists() and Path(download["path"]).parent != built.parent

    layout = RunDir(run)
    git_config = ROOT / ".git" / "config" if (ROOT / ".git").is_dir() else ROOT / ".git"  # a worktree's .git is a file
    secret_files = [layout.events, layout.config, layout.log, layout.resolved,
                    layout.checkpoint(1) / "adapter_model.safetensors",
                    layout.adapter / "adapter_model.safetensors", runs / ACTIVE,
                    runs / ".uploads" / "abc-kept.jsonl", git_config, ROOT / "README.md", built,
                    built.with_name(built.name + ".verification.json")]
    for f in secret_files:
        assert f.exists(), f
    cache = Path(download["path"]).parent  # where the download is served from; a traversal out of it to the run
    rel = os.path.relpath(layout.events, cache)
    escaped = rel.replace("..", "%2e%2e")
    attempts = [
        "/gradio_api/file=/etc/passwd", "/file=/etc/passwd", "/gradio_api/file=/proc/self/environ",
        "/gradio_api/file=%2Fetc%2Fpasswd", "/gradio_api/file=%2fetc%2fpasswd", "/gradio_api/file=/ETC/PASSWD",
        "/gradio_api/file=../../../../../../etc/passwd", "/gradio_api/file=%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/gradio_api/file=%252e%252e/%252e%252e/etc/passwd", "/gradio_api/file=..%5c..%5c..%5cetc%5cpasswd",
        "/gradio_api/file=.git/config", "/gradio_api/file=README.md", "/gradio_api/file=~/.bashrc",
        f"/gradio_api/file={cache}/{rel}", f"/gradio_api/file={cache}/{escaped}",
        f"/gradio_api/file={cache}/{quote(rel, safe='')}", f"/gradio_api/file={cache}/{rel.replace('/', '%5c')}",
        f"/gradio_api/file={cache}/{escaped.replace('%', '%25')}", f"/gradio_api/file={str(run).upper()}/EVENTS.JSONL",
        f"/gradio_api/file={cache}/{built.name}.verification.json",
        f"/gradio_api/file={quote(str(uploaded))}/../../../etc/passwd",
        f"/file={run}/events.jsonl",
    ] + [f"/gradio_api/file={quote(str(f))}" for f in secret_files] + [f"/gradio_api/file={f}" for f in secret_files]
    served = []
    for path in attempts:
        status, body = get(url, path)
        if status < 400 or b"root:" in body or b"secret log" in body:
            served.append((path, status))
    assert not served, served
    print(f"\n[exposure] {len(attempts)} file requests refused; 2 allowed (an upload, an export)")


@pytest.mark.slow
def test_a_merged_download_is_a_copy_in_gradios_cache(server) -> None:
    """The merged model's download: a zip handed to gradio, named by no folder of the server, without the
    verification (it quotes the held-out rows); the zip built under the runs folder goes once gradio has its copy."""
    import io
    import zipfile

    from phi3_lora.runs import exports_dir

    url, runs = server
    said, (_, update) = raw_call(url, "export_merged", [RUN_ID, "merged", "auto"])
    download = update["value"]
    for folder in (str(runs), str(runs.parent), str(ROOT)):
        assert folder not in said, (folder, said[:800])
    status, body = get(url, urlparse(download["url"]).path)
    assert status == 200
    names = zipfile.ZipFile(io.BytesIO(body)).namelist()
    top = f"{RUN_ID}-merged"  # the one folder inside: named by the run (export_tab.download_name)
    assert f"{top}/{RunDir.ADAPTER_CONFIG}" not in names and f"{top}/config.json" in names, names
    assert not any(n.endswith("verification.json") for n in names), names
    assert (runs / RUN_ID / "merged" / "verification.json").exists()
    assert not list(exports_dir(runs, RUN_ID).glob("*merged*")), "the built zip stays on the disk"


@pytest.mark.slow
def test_no_answer_to_a_visitor_names_a_server_folder(tmp_path_factory: pytest.TempPathFactory,
                                                       tiny_llama_dir: Path) -> None:
    """An attacker's view of a shared app whose default model is a folder of the server: the page, the API page and
    every answer of the dataset, settings and export flows, read as the bytes the server sends, name no folder of
    the server (the runs folder, the model folder, the checkout, the home folder); the form's names (the upload, the
    sample, the default model) still validate, estimate and export."""
    import httpx
    from gradio_client import Client

    from helpers.apps import endpoint_args
    from phi3_lora.ui import build_app, launch
    from phi3_lora.ui.common import AppOptions

    runs = tmp_path_factory.mktemp("visited") / "runs"
    runs.mkdir()
    make_adapter_run(runs, tiny_llama_dir)
    demo = build_app(options=AppOptions(runs_dir=runs, default_model=str(tiny_llama_dir), shared=True))
    _, url, _ = launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    home = os.path.expanduser("~")
    folders = {"runs folder": str(runs), "model folder": str(tiny_llama_dir), "checkout": str(ROOT),
               "home folder": home + "/", "model folder's name as a path": f"/{tiny_llama_dir.name}"}
    try:
        base = url.rstrip("/")
        api = Client(url, verbose=False).view_api(print_info=False, return_format="dict")
        said = {"page": httpx.get(base + "/config").text, "API page": httpx.get(base + "/gradio_api/info").text}
        uploaded = httpx.post(base + "/gradio_api/upload", files={"files": ("mine.jsonl", SAMPLE.read_bytes())})
        file = {"path": uploaded.json()[0], "meta": {"_type": "gradio.FileData"}, "orig_name": "mine.jsonl"}
        session = "visitor1"
        said["upload"], (source,) = raw_call(url, "upload_dataset", [file], session)
        assert source.startswith("upload:") and source.endswith("-mine.jsonl"), source
        said["validate upload"], out = raw_call(url, "validate_after_upload", endpoint_args(
            api, "validate_after_upload", **{"Data source": source}), session)
        assert "usable of" in out[0], out[0][:300]
        said["sample"], (sample, _) = raw_call(url, "use_sample", [], session)
        said["validate sample"], out = raw_call(url, "validate_sample", endpoint_args(
            api, "validate_sample", **{"Data source": sample}), session)
        assert "usable of" in out[0], out[0][:300]
        for endpoint in ("show_config", "estimate", "model_layers"):
            labels = {p.get("label") for p in api["named_endpoints"][f"/{endpoint}"]["parameters"]}
            given = {"Data source": source} if "Data source" in labels else {}
            said[endpoint], _ = raw_call(url, endpoint, endpoint_args(api, endpoint, **given), session)
        assert "tiny_llama" in said["show_config"] and "Trainable parameters" in said["estimate"]
        client = Client(url, verbose=False)  # an endpoint with a session state input: gradio_client fills it
        said["time_estimate"] = json.dumps(client.predict(*endpoint_args(api, "time_estimate", **{
            "Data source": sample}), api_name="/time_estimate"), default=str)
        for endpoint in ("load_page", "list_runs"):
            said[endpoint], _ = raw_call(url, endpoint, endpoint_args(api, endpoint), session)
        said["export_zip"], _ = raw_call(url, "export_zip", [RUN_ID], session)
        leaks = [(what, name) for what, text in said.items() for name, folder in folders.items() if folder in text]
        assert not leaks, leaks
    finally:
        demo.close()


def test_no_pickle_loading_remote_code_or_shell_in_our_code() -> None:
    banned = {r"\btorch\.load\(": "torch.load", r"\bpickle\.loads?\(": "pickle.load", r"\bdill\.": "dill",
              r"\bjoblib\.load\(": "joblib.load", r"trust_remote_code\s*=\s*True": "trust_remote_code enabled",
              r"shell\s*=\s*True": "a shell command line", r"weights_only\s*=\s*False": "weights_only=False",
              r"\bos\.system\(": "os.system", r"(?<![\w.])eval\(": "eval("}
    files = [ROOT / "app.py", *sorted((ROOT / "phi3_lora").rglob("*.py")), *sorted((ROOT / "spaces_config").rglob("*.py"))]
    assert len(files) > 10
    found = []
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            for pattern, name in banned.items():
                if re.search(pattern, code):
                    found.append(f"{f.relative_to(ROOT)}:{n}: {name}")
    assert not found, found


def test_adapter_with_only_a_pickle_is_refused(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from phi3_lora import export
    from phi3_lora.generate import ChatEngine
    from phi3_lora.adapter_folder import locate_adapter

    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_llama_dir),
                                                            "peft_type": "LORA", "r": 2}))
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    for attempt in (lambda: locate_adapter(folder), lambda: export.adapter_zip(folder, tmp_path / "out"),
                    lambda: ChatEngine(str(tiny_llama_dir)).set_adapter(folder)):
        with pytest.raises(UserError) as info:
            attempt()
        message = str(info.value)
        assert "adapter_model.bin" in message and "adapter_model.safetensors" in message and "pickle" in message
    # The same inside a run folder's checkpoint.
    run = tmp_path / "run"
    ckpt = RunDir(run).checkpoint(2)
    ckpt.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.bin"):
        (ckpt / name).write_bytes((folder / name).read_bytes())
    (ckpt / RunDir.TRAINER_STATE).write_text("{}")
    with pytest.raises(UserError, match="adapter_model.bin"):
        locate_adapter(run)


@pytest.mark.slow
def test_auth_gates_the_api_and_training(tmp_path: Path, tiny_llama_dir: Path) -> None:
    import httpx
    from gradio_client import Client

    from phi3_lora.ui import build_app, launch

    runs = tmp_path / "runs"
    demo = build_app(runs, default_model=str(tiny_llama_dir))
    _, url, _ = launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True, auth=("alice", "s3cret"))
    try:
        with pytest.raises(Exception):
            Client(url, verbose=False)  # no credentials: not even the API description
        with pytest.raises(Exception):
            Client(url, auth=("alice", "wrong"), verbose=False)
        base = url.rstrip("/")
        for method, path in (("post", "/gradio_api/call/start_training"), ("post", "/gradio_api/queue/join"),
                             ("get", "/config"), ("get", "/gradio_api/info"), ("post", "/gradio_api/upload")):
            r = httpx.request(method.upper(), base + path, json={"data": []} if path.endswith("training") else None)
            assert r.status_code in (401, 403), (path, r.status_code)
        assert jobs.active_run(runs) is None and not run_dirs(runs)

        c = Client(url, auth=("alice", "s3cret"), verbose=False)
        args = start_args(c, **{"Data source": str(SAMPLE), "Max steps": 400, "Max length (tokens)": 128})
        run_id = val(c.predict(*args, api_name="/start_training")[0])
        assert jobs.active_run(runs) == run_id
        jobs.stop_run(run_id, runs, grace=10)
    finally:
        active = jobs.active_run(runs)
        if active:
            jobs.stop_run(active, runs, grace=5)
        demo.close()


@pytest.mark.parametrize("name", ["../../etc", "/tmp/elsewhere", "~/x", ".hidden", "a/b", "adapter", "x" * 80,
                                  "tensorboard", "mlruns"])  # a run's tracker logs: a merge would replace them
def test_merge_from_the_web_writes_only_inside_the_run(name, tmp_path):
    from phi3_lora.errors import UserError
    from phi3_lora.ui.export_tab import merge_destination

    with pytest.raises(UserError, match="folder name"):
        merge_destination(tmp_path / "run", name)
    assert merge_destination(tmp_path / "run", "") == tmp_path / "run" / "merged"
    assert merge_destination(tmp_path / "run", "merged-v2") == tmp_path / "run" / "merged-v2"
