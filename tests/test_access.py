"""The access policy (phi3_lora.access) and its gate on every endpoint of the running app.

Pure part: levels from how the app was started, data sources and model names from the web, tokens.
Served part (slow): the real app on a free port in each sharing mode (owner, --demo, a share link without
auth, --auth, a Space with Sign in with Hugging Face, signed out). Every named endpoint of the API info must be
classified in access.ENDPOINTS, and every gated action of every endpoint is tried, as an outsider would, at
each level that may not use it: it must be refused with the policy's message and change nothing (issue 13,
items 1-3: Stop and Resume past the gates, a server path such as /tmp/creds.csv read through Validate).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from helpers.apps import SAMPLE, endpoint_args, free_port, raw_call
from helpers.run_folders import RUN_ID, make_adapter_run
from phi3_lora import access, events, spaces
from phi3_lora.access import Action, Level, Requester, ServerMode
from phi3_lora.runs import ProcessRecord, RunDir, write_active

A = Action
ROOT = Path(__file__).resolve().parents[1]
ACTIVE_ID = "20260101-000001-active"
STOPPED_ID = "20260101-000002-stopped"
ALICE_ID = "20260101-000003-alices"
SECRET = "hunter2-d0n7-l34k"


# --- the policy as data ------------------------------------------------------------------------------

def test_every_action_has_a_rule_for_every_level_and_owner_may_do_everything() -> None:
    assert set(access.POLICY) == set(Action)
    for action in Action:
        assert access.rule(action, Level.OWNER) is access.Rule.YES
        assert access.rule(action, Level.ANONYMOUS) in (access.Rule.YES, access.Rule.NO)  # no identity to own
    for endpoint, actions in access.ENDPOINTS.items():
        assert actions and all(isinstance(a, Action) for a in actions), endpoint


def test_levels_follow_how_the_app_was_started() -> None:
    def level(**mode: Any) -> Level:
        kw = {k: mode.pop(k) for k in ("username", "oauth_user") if k in mode}
        return access.requester(ServerMode(**mode), **kw).level

    assert level() is Level.OWNER                                       # python app.py, on loopback
    assert level(host="localhost") is Level.OWNER
    assert level(host="0.0.0.0") is Level.ANONYMOUS                     # the LAN, no --auth
    assert level(shared=True) is Level.ANONYMOUS                        # --share, no --auth
    assert level(demo=True) is Level.ANONYMOUS                          # --demo, even on loopback
    assert level(on_space=True) is Level.ANONYMOUS                      # a public Space
    assert level(on_space=True, oauth=True) is Level.ANONYMOUS          # signed out
    assert level(on_space=True, oauth=True, oauth_user="bob") is Level.SIGNED_IN
    assert level(oauth_user="bob") is Level.OWNER                       # no OAuth here: a session cannot claim it
    assert level(auth=True, username="alice") is Level.SIGNED_IN        # --auth: never the owner
    assert level(auth=True) is Level.ANONYMOUS
    assert level(shared=True, auth=True, username="alice") is Level.SIGNED_IN
    assert level(launched=False) is Level.ANONYMOUS                     # launched by something else: fail closed
    assert access.requester(ServerMode(auth=True), username="alice").identity == "auth:alice"
    assert "tok" not in repr(access.Requester(Level.SIGNED_IN, "hf:bob", "tok-secret"))


def test_stop_and_resume_only_for_the_runs_a_visitor_started() -> None:
    mode = ServerMode(auth=True)
    alice = access.requester(mode, username="alice")
    for action in (A.STOP, A.RESUME, A.DELETE):
        assert access.refusal(action, alice, mode, started_by="auth:alice") is None
        assert "only for runs they started" in access.refusal(action, alice, mode, started_by="auth:bob")
        assert access.refusal(action, alice, mode, started_by=None)  # started before the ledger, by the CLI...
    anonymous = Requester(Level.ANONYMOUS)
    for mode in (ServerMode(demo=True), ServerMode(shared=True), ServerMode(on_space=True, oauth=True)):
        for action in (A.START, A.STOP, A.RESUME, A.MERGE, A.PUSH, A.READ_SERVER_PATH, A.SERVER_TOKEN):
            assert access.refusal(action, anonymous, mode, started_by=None)
    demo = ServerMode(demo=True, auth=True)
    signed = access.requester(demo, username="alice")
    assert access.refusal(A.START, signed, demo) and access.refusal(A.MERGE, signed, demo)
    assert access.refusal(A.PUSH, signed, demo) is None and access.refusal(A.COMPARE_HUB, signed, demo) is None


def test_hub_token_is_the_visitors_own_or_none() -> None:
    owner, anon = Requester(Level.OWNER, "owner"), Requester(Level.ANONYMOUS)
    signed = Requester(Level.SIGNED_IN, "hf:bob", oauth_token="hf_bobs")
    assert access.hub_token(owner, "") is None            # huggingface_hub's default: the machine's login
    assert access.hub_token(owner, " hf_typed ") == "hf_typed"
    assert access.hub_token(anon, "") is False            # False: send no token at all
    assert access.hub_token(Requester(Level.SIGNED_IN, "auth:alice"), None) is False
    assert access.hub_token(signed, "") == "hf_bobs"
    assert access.hub_token(signed, "hf_typed") == "hf_typed"


def test_data_sources_from_the_web(tmp_path: Path) -> None:
    uploads = tmp_path / "runs" / ".uploads" / "sessions" / "abc"
    uploads.mkdir(parents=True)
    mine = uploads / "1234-mine.jsonl"
    mine.write_text("{}\n")
    creds = tmp_path / "creds.csv"
    creds.write_text(f"user,password\nroot,{SECRET}\n")
    (uploads / "link.csv").symlink_to(creds)
    (tmp_path / "sample-link.jsonl").symlink_to(SAMPLE)
    other = uploads.parent / "other"
    other.mkdir()
    (other / "theirs.jsonl").write_text("{}\n")

    def kind(source: str, hub: bool = False) -> Action:
        return access.source_action(source, sample=SAMPLE, uploads=uploads, is_hub_id=hub)

    assert kind(str(SAMPLE)) is A.READ_SAMPLE
    assert kind(str(mine)) is A.READ_UPLOAD
    assert kind("someone/chat-data", hub=True) is A.READ_HUB_DATA
    for attack in (str(creds), "~/creds.csv", "creds.csv", "data/sample_chat.jsonl", str(uploads / "link.csv"),
                   str(tmp_path / "sample-link.jsonl"), f"{uploads}/../other/theirs.jsonl", str(other / "theirs.jsonl"),
                   f"{uploads}/../../../creds.csv", "/etc/passwd", "/proc/self/environ", str(uploads)):
        assert kind(attack) is A.READ_SERVER_PATH, attack
    assert access.source_action(str(mine), sample=SAMPLE, uploads=None, is_hub_id=False) is A.READ_SERVER_PATH


def test_chat_templates_from_the_web(tmp_path: Path) -> None:
    """model.chat_template is template text (fine: rendered in a sandbox) or the path of a file to read."""
    from phi3_lora.models import template_is_text

    def kind(value: str | None) -> Action:
        return access.template_action(value, is_text=template_is_text(value))

    assert kind(None) is A.VIEW and kind("  ") is A.VIEW
    assert kind("{% for m in messages %}{{ m.content }}{% endfor %}") is A.VIEW
    for attack in ("/etc/passwd", "~/.cache/huggingface/token", "chat.jinja", str(tmp_path), "../x.jinja"):
        assert kind(attack) is A.READ_SERVER_PATH, attack


def test_model_names_from_the_web() -> None:
    known = {"embedded: SmolLM2-135M-Instruct", "/srv/models/default"}
    assert access.model_action("microsoft/Phi-3-mini-4k-instruct", known=known, is_path=False) is A.USE_HUB_MODEL
    assert access.model_action("/srv/models/default", known=known, is_path=True) is A.USE_HUB_MODEL  # the app's
    for attack, is_path in (("/root/private-model", False), ("~/models/x", False), ("./m", False), ("a/b/c", False),
                            ("models", True), ("someone/model", True)):
        assert access.model_action(attack, known=known, is_path=is_path) is A.READ_SERVER_PATH, attack


# --- the running app -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Iterator[dict[str, Any]]:
    """One runs folder: a finished run, a stopped one, and an 'active' one whose process is a sleep the test
    owns (Stop must never reach it from a visitor), plus a creds.csv outside everything."""
    runs = tmp_path_factory.mktemp("runs")
    make_adapter_run(runs, tiny_llama_dir)
    stopped = make_adapter_run(runs, tiny_llama_dir, STOPPED_ID)
    RunDir(stopped).events.unlink()
    events.append_event(stopped, "start", step=0, max_steps=50)
    events.append_event(stopped, "end", status="stopped", step=1, max_steps=50, reason="stopped by you")
    active = make_adapter_run(runs, tiny_llama_dir, ACTIVE_ID)
    RunDir(active).events.unlink()
    events.append_event(active, "start", step=0, max_steps=50)
    sleeper = subprocess.Popen(["sleep", "900"], start_new_session=True)
    record = ProcessRecord.of(sleeper.pid)  # its start time proves it is this run's process
    RunDir(active).write_process(record)
    write_active(runs, ACTIVE_ID, record)
    starters = access.RunStarters(runs)
    for run_id in (RUN_ID, STOPPED_ID, ACTIVE_ID):
        starters.record(run_id, "owner")
    RunDir(runs / RUN_ID).eval_rows.write_text(json.dumps({"messages": [  # the owner's held-out rows
        {"role": "user", "content": f"my password is {SECRET}"}, {"role": "assistant", "content": "noted"}]}) + "\n")
    secrets_dir = tmp_path_factory.mktemp("elsewhere")
    creds = secrets_dir / "creds.csv"
    creds.write_text(f"user,password\nroot,{SECRET}\n")
    try:
        yield {"runs": runs, "model": tiny_llama_dir, "sleeper": sleeper, "creds": creds}
    finally:
        if sleeper.poll() is None:
            os.killpg(sleeper.pid, signal.SIGKILL)
        sleeper.wait()


@contextmanager
def serve(world: dict[str, Any], auth: Any = None, **options: Any) -> Iterator[tuple[str, Any]]:
    from phi3_lora.ui import AppOptions, build_app, launch

    demo = build_app(options=AppOptions(runs_dir=world["runs"], default_model=str(world["model"]), **options))
    _, url, _ = launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True, auth=auth)
    try:
        yield url, demo
    finally:
        demo.close()


# How an outsider reaches each gated action of each endpoint: (endpoint, action) -> the inputs (by widget label)
# that make the endpoint attempt it. The test fails if ENDPOINTS gains a gated pair that has no attack here.
def _data_attacks(endpoint: str) -> dict[tuple[str, Action], Callable[[dict[str, Any]], dict[str, Any]]]:
    return {(endpoint, A.READ_SERVER_PATH): lambda w: {"Data source": str(w["creds"])},
            (endpoint, A.READ_HUB_DATA): lambda w: {"Data source": "someone/private-chat-data"}}


def _model_attack(endpoint: str, label: str = "Base model") -> dict[tuple[str, Action], Callable]:
    return {(endpoint, A.READ_SERVER_PATH): lambda w: {label: str(w["creds"].parent)}}


ATTACKS: dict[tuple[str, Action], Callable[[dict[str, Any]], dict[str, Any]]] = {
    **_model_attack("model_layers"), **_model_attack("estimate"), **_model_attack("apply_preset"),
    **_model_attack("show_config"), **_model_attack("render_example"),
    **_data_attacks("validate"), **_data_attacks("validate_source"), **_data_attacks("validate_sample"),
    **_data_attacks("validate_after_upload"), **_data_attacks("time_estimate"), **_data_attacks("measure_step_time"),
    ("measure_step_time", A.START): lambda w: {"Data source": str(SAMPLE), "Max steps": 2},
    ("start_training", A.START): lambda w: {"Data source": str(SAMPLE), "Max steps": 2},
    **_data_attacks("start_training"),
    ("stop_training", A.STOP): lambda w: {"Run": ACTIVE_ID},
    ("load_run_settings", A.LOAD_RUN_SETTINGS): lambda w: {"Run": RUN_ID},
    ("resume_training", A.RESUME): lambda w: {"Run": STOPPED_ID},
    ("delete_run", A.DELETE): lambda w: {"Run": STOPPED_ID},
    ("compare", A.READ_SERVER_PATH): lambda w: {"Adapter": "evil/adapter-on-a-server-model",
                                                "Prompt": "What do you know?"},
    ("evaluate", A.EVALUATE): lambda w: {"Adapter": RUN_ID},
    ("heldout_example", A.READ_RUN_DATA): lambda w: {"Adapter": RUN_ID},
    ("export_merged", A.MERGE): lambda w: {"Adapter": RUN_ID, "Folder name": "merged-by-visitor"},
    ("export_gguf", A.MERGE): lambda w: {"Adapter": RUN_ID, "Type": "q8_0"},
    ("push_to_hub", A.PUSH): lambda w: {"Adapter": RUN_ID, "Repo id": "visitor/stolen", "Push": "adapter"},
    ("push_to_hub", A.MERGE): lambda w: {"Adapter": RUN_ID, "Repo id": "visitor/stolen", "Push": "merged",
                                         "Hugging Face token": "hf_visitors_own"},
}
# The model attack on the data endpoints and Start: a base model that is a folder of the server.
for _e in ("validate", "validate_source", "validate_sample", "validate_after_upload", "start_training",
           "time_estimate", "measure_step_time"):
    ATTACKS[(_e, A.READ_SERVER_PATH, "model")] = lambda w: {"Base model": str(w["creds"].parent)}  # type: ignore
def _yaml_naming_a_server_model(w: dict[str, Any]) -> dict[str, Any]:
    """A run.yaml of the visitor's own whose base model is a folder of the server (loading it reads that folder)."""
    from gradio_client import handle_file

    path = w["creds"].parent / "visitors-run.yaml"
    path.write_text(f"model:\n  name: {w['creds'].parent}\n")
    return {"…or a run.yaml": handle_file(str(path))}


ATTACKS[("load_yaml_settings", A.READ_SERVER_PATH)] = _yaml_naming_a_server_model
# A chat template is a file the training process reads: a server file named there is a server path too.
for _e in ("show_config", "start_training", "time_estimate", "measure_step_time"):
    ATTACKS[(_e, A.READ_SERVER_PATH, "template")] = lambda w: {  # type: ignore
        "Chat template file": str(w["creds"]), "Data source": str(SAMPLE), "Max steps": 2}


def gated_pairs() -> set[tuple[str, Action]]:
    return {(e, a) for e, actions in access.ENDPOINTS.items() for a in actions if access.gated(a)}


def test_every_gated_action_of_every_endpoint_has_an_attack() -> None:
    tried = {key[:2] for key in ATTACKS}
    assert gated_pairs() <= tried, sorted(gated_pairs() - tried)


def fake_hub_adapter(cache: Path, repo_id: str, base: str) -> None:
    """A published adapter in the Hub cache, as snapshot_download leaves it (served offline from there)."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (snap / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": base, "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4,
        "target_modules": ["q_proj", "v_proj"]}))
    (snap / "adapter_model.safetensors").write_bytes(b"")


MODES = {
    # name: (launch options, auth, the level a request of the test's client has, its identity)
    "demo": ({"demo_mode": True}, None, Level.ANONYMOUS, None),
    "share": ({"shared": True}, None, Level.ANONYMOUS, None),
    "auth": ({}, [("alice", "pw-alice"), ("bob", "pw-bob")], Level.SIGNED_IN, "auth:alice"),
    "space-signed-out": ({"space": True}, None, Level.ANONYMOUS, None),
}


def _refused(text: str, who: Requester, mode: ServerMode, actions: tuple[Action, ...], started_by: str | None,
             options: Any) -> bool:
    expected = [access.refusal(a, who, mode, started_by=started_by) for a in actions]
    expected += [options.training_refusal] if options.training_refusal else []
    return any(e and e in text for e in expected)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Gradio does not support OAuth features")
@pytest.mark.parametrize("mode_name", list(MODES))
def test_every_endpoint_is_classified_and_refuses_what_the_level_may_not_do(
        mode_name: str, world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gradio.oauth
    import huggingface_hub.constants
    from gradio_client import Client

    options, auth, level, identity = MODES[mode_name]
    if options.pop("space", False):
        monkeypatch.setattr(gradio.oauth, "_get_mocked_oauth_info", lambda: {
            "access_token": "hf_fake", "token_type": "bearer", "expires_in": 3600,
            "userinfo": {"sub": "1", "name": "A", "preferred_username": "a", "profile": "", "picture": "",
                         "website": ""}})
        space = spaces.detect({"SPACE_ID": "a/b", "OAUTH_CLIENT_ID": "x"}, data_dir=tmp_path / "none")
        options = {"space_env": space, "login_required": spaces.login_required(space, demo=False)}
    # A published adapter whose base model is a folder of this server (served from the Hub cache, offline).
    cache = tmp_path / "hub"
    fake_hub_adapter(cache, "evil/adapter-on-a-server-model", str(world["creds"].parent))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    runs: Path = world["runs"]
    before = sorted(p.name for p in runs.iterdir())

    with serve(world, auth=auth, **options) as (url, demo):
        state = demo.phi3_state
        mode = state.mode
        assert not mode.owner_at_the_machine
        client = Client(url, auth=auth[0] if auth else None, verbose=False)
        api = client.view_api(print_info=False, return_format="dict")
        served = {name.lstrip("/") for name in api["named_endpoints"]}
        unclassified, stale = served - set(access.ENDPOINTS), set(access.ENDPOINTS) - served - access.OPTIONAL_ENDPOINTS
        assert not unclassified and not stale, ("unclassified endpoints", unclassified, "stale entries", stale)
        who = Requester(level, identity)
        tried = []
        for key, make in ATTACKS.items():
            endpoint, action = key[0], key[1]
            run_id = make(world).get("Run")
            started_by = state.starters.get(run_id) if run_id else None
            if access.refusal(action, who, mode, started_by=started_by) is None:
                continue  # this level may do it
            args = endpoint_args(api, endpoint, **make(world))
            try:
                result = client.predict(*args, api_name=f"/{endpoint}")
                text = json.dumps(result, default=str)
            except Exception as exc:  # a gr.Error reaches the client as an exception with its message
                text = str(exc)
            assert _refused(text, who, mode, access.ENDPOINTS[endpoint], started_by, demo.phi3_options), \
                (mode_name, key, text[:600])
            assert SECRET not in text and "Traceback" not in text
            tried.append(key)
        assert tried, "no attack was refused: the test did not test anything"

    # Nothing changed: no new run or merged folder, the 'active' run's process lives and was not told to stop,
    # the stopped run was not resumed.
    assert sorted(p.name for p in runs.iterdir() if p.name != ".uploads") == [b for b in before if b != ".uploads"]
    assert world["sleeper"].poll() is None
    assert events.run_status(runs / ACTIVE_ID).state == "running"
    assert events.run_status(runs / STOPPED_ID).state == "stopped"
    assert not (runs / RUN_ID / "merged-by-visitor").exists()
    assert not (runs / RUN_ID / "eval").exists()
    print(f"\n[access] {mode_name}: {len(tried)} attacks refused on {len({k[0] for k in tried})} endpoints")


@pytest.mark.slow
def test_owner_at_the_machine_may_read_a_server_path_and_a_signed_in_visitor_stops_only_their_run(
        world: dict[str, Any]) -> None:
    """The positive side of the gate: the owner's validate of a server path reads it (so the attacks above
    reach the gate and are refused by it), and Alice may stop the run she started but not the owner's."""
    from gradio_client import Client

    with serve(world) as (url, demo):
        assert demo.phi3_state.mode.owner_at_the_machine
        client = Client(url, verbose=False)
        api = client.view_api(print_info=False, return_format="dict")
        summary = client.predict(*endpoint_args(api, "validate", **{"Data source": str(SAMPLE)}),
                                 api_name="/validate")[0]
        assert "usable" in summary

    alice_run = make_adapter_run(world["runs"], world["model"], ALICE_ID)
    RunDir(alice_run).events.unlink()
    events.append_event(alice_run, "start", step=0, max_steps=50)
    sleeper = subprocess.Popen(["sleep", "900"], start_new_session=True)
    RunDir(alice_run).write_process(ProcessRecord.of(sleeper.pid))
    access.RunStarters(world["runs"]).record(ALICE_ID, "auth:alice")
    try:
        with serve(world, auth=[("alice", "pw-alice")]) as (url, demo):
            client = Client(url, auth=("alice", "pw-alice"), verbose=False)
            api = client.view_api(print_info=False, return_format="dict")
            result = client.predict(*endpoint_args(api, "stop_training", Run=ALICE_ID), api_name="/stop_training")
            assert ALICE_ID in json.dumps(result, default=str)
            deadline = time.time() + 30
            while sleeper.poll() is None and time.time() < deadline:
                time.sleep(0.2)
            assert events.run_status(alice_run).state != "running"
    finally:
        if sleeper.poll() is None:
            os.killpg(sleeper.pid, signal.SIGKILL)
        sleeper.wait()
        import shutil

        shutil.rmtree(alice_run, ignore_errors=True)


LEAKY_ID = "20260101-000004-leaky"


@pytest.mark.slow
@pytest.mark.parametrize("mode_name", ["share", "auth"])
def test_what_a_visitor_sees_names_no_folder_of_the_server(mode_name: str, world: dict[str, Any]) -> None:
    """A run's log names the server's folders, its model folder and its data file (the very paths that make
    "load a past run's settings" own-runs only), and error messages named the runs folder. A visitor sees the log
    of the runs they started only; the messages and the run status name no server folder."""
    from gradio_client import Client, handle_file

    runs: Path = world["runs"]
    leaky = make_adapter_run(runs, world["model"], LEAKY_ID)
    data_path = str(world["creds"])
    RunDir(leaky).log.write_text(f"$ python -m phi3_lora train --config {leaky}/config.yaml\n"
                                 f"error: {data_path} line 3: bad row\n")
    RunDir(leaky).events.unlink()
    events.append_event(leaky, "start", step=0, max_steps=50)
    events.append_event(leaky, "checkpoint", step=1, max_steps=50, path=str(RunDir(leaky).checkpoint(1)))
    events.append_event(leaky, "error", reason=f"failed: {data_path} line 3: bad row")  # the training's exception
    access.RunStarters(runs).record(LEAKY_ID, "owner")
    alices = make_adapter_run(runs, world["model"], ALICE_ID)
    RunDir(alices).log.write_text("alice's own log line\n")
    access.RunStarters(runs).record(ALICE_ID, "auth:alice")
    bad_yaml = world["creds"].parent / "bad-run.yaml"
    bad_yaml.write_text("model: [1, 2\n")  # a visitor's YAML that does not parse: the message names the upload only
    options, auth, _, _ = MODES[mode_name]
    try:
        with serve(world, auth=auth, **options) as (url, demo):
            client = Client(url, auth=auth[0] if auth else None, verbose=False)
            api = client.view_api(print_info=False, return_format="dict")
            seen = []
            for endpoint, by_label in (("select_run", {"Run": LEAKY_ID}), ("list_runs", {"Run": LEAKY_ID}),
                                       ("poll_run", {"Run": LEAKY_ID}), ("load_page", {}),
                                       ("compare", {"Adapter": LEAKY_ID, "Prompt": "hi", "Max new tokens": 8}),
                                       ("select_run", {"Run": "no-such-run"}), ("compare", {"Adapter": "no-such-run",
                                                                                             "Prompt": "hi"}),
                                       ("export_zip", {"Adapter": "no-such-run"}),
                                       ("heldout_example", {"Adapter": "no-such-run"}),
                                       ("load_yaml_settings", {"…or a run.yaml": handle_file(str(bad_yaml))})):
                try:
                    text = json.dumps(client.predict(*endpoint_args(api, endpoint, **by_label),
                                                     api_name=f"/{endpoint}"), default=str)
                except Exception as exc:
                    text = str(exc)
                seen.append(text)
                for secret in (str(runs), data_path, "phi3_lora train --config", "/bad-run.yaml", str(world["model"])):
                    assert secret not in text, (mode_name, endpoint, by_label, secret, text[:800])
            assert "bad-run.yaml is not valid YAML" in seen[-1], seen[-1][:400]
            assert "checkpoint-1" in seen[0]  # the status still says which checkpoint Resume continues from
            if mode_name == "auth":  # Alice sees the log of her own run
                mine = json.dumps(client.predict(*endpoint_args(api, "select_run", Run=ALICE_ID),
                                                 api_name="/select_run"), default=str)
                assert "alice's own log line" in mine
    finally:
        import shutil

        shutil.rmtree(leaky, ignore_errors=True)
        shutil.rmtree(alices, ignore_errors=True)


ROWS_ID = "20260101-000005-rows"
ROW_PROMPT, ROW_REFERENCE = "owner-only prompt 7f3a: the Q3 salary bands", "owner-only reference 9c1e: 120k"


def write_rows_and_scores(run_dir: Path, prompt: str, reference: str) -> None:
    """Held-out rows and a saved evaluation of them (as Compare → Evaluate leaves it), without generating."""
    from phi3_lora import evaluate, scores

    run = RunDir(run_dir)
    row = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reference}]}
    run.eval_rows.write_text(json.dumps(row) + "\n", encoding="utf-8")
    answers = {"base": f"base says {reference}", "tuned": f"tuned says {reference}"}
    sc = {side: scores.answer_scores(text, reference) for side, text in answers.items()}
    record = {"row": 0, "prompt": prompt, "history": row["messages"][:1], "reference": reference, **answers,
              "scores": sc, "loss": None, "change": sc["tuned"]["rougeL"] - sc["base"]["rougeL"]}
    evaluate.save_result({"version": evaluate.FORMAT_VERSION, "created": "2026-01-01T00:00:00", "model": "m",
                          "adapter": str(run.adapter), "source": f"held-out rows of run {run.run_id}",
                          "settings": {"max_new_tokens": 8}, "summary": scores.summarise([record], resamples=10),
                          "rows": [record], "skipped": [{"where": "row 2", "reason": f"{prompt} is too long"}],
                          "not_reached": 0, "complete": True}, run.path)


@pytest.mark.slow
@pytest.mark.parametrize("mode_name", ["share", "auth"])
def test_a_visitor_sees_scores_but_not_the_text_of_the_owners_rows(
        mode_name: str, world: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The held-out rows are the data of whoever trained on them: the held-out example, the scoring panel's row
    table and skipped rows, the exports' verification (on the page and in the zip's README) give a visitor the
    scores but none of the owner's prompts, references or the answers to them. Alice reads her own run's rows."""
    import zipfile

    from gradio_client import Client

    from phi3_lora import export, verify

    runs: Path = world["runs"]
    owners = make_adapter_run(runs, world["model"], ROWS_ID)
    write_rows_and_scores(owners, ROW_PROMPT, ROW_REFERENCE)
    access.RunStarters(runs).record(ROWS_ID, "owner")
    alices = make_adapter_run(runs, world["model"], ALICE_ID)
    write_rows_and_scores(alices, "alices prompt 4d2b", "alices reference 8e0f")
    access.RunStarters(runs).record(ALICE_ID, "auth:alice")

    def verified(path: Path, kind: str, ref: Any, engine: Any = None) -> Any:  # no model loads: what differed
        rows = RunDir(Path(ref.adapter_dir).parent).eval_rows
        prompt = json.loads(rows.read_text())["messages"][0]["content"]
        return verify.Verification(kind, 1, 0, 3, 4, [f"#1 {prompt[:40]!r}: differs from token 1 of 4"],
                                   differ_at=["#1: differs from token 1 of 4"])

    monkeypatch.setattr(export, "verify_adapter_export", verified)
    options, auth, _, _ = MODES[mode_name]
    try:
        with serve(world, auth=auth, **options) as (url, demo):
            client = Client(url, auth=auth[0] if auth else None, verbose=False)
            api = client.view_api(print_info=False, return_format="dict")

            def call(endpoint: str, run_id: str) -> str:
                try:
                    out = client.predict(*endpoint_args(api, endpoint, Adapter=run_id), api_name=f"/{endpoint}")
                except Exception as exc:  # a refusal reaches the client as its message
                    return str(exc)
                text = json.dumps(out, default=str)
                files = [o for o in (out if isinstance(out, (list, tuple)) else [out])
                         if isinstance(o, str) and o.endswith(".zip") and Path(o).exists()]
                for file in files:  # the download itself
                    with zipfile.ZipFile(file) as zf:
                        text += "".join(zf.read(n).decode("utf-8", "replace") for n in zf.namelist()
                                        if n.endswith((".md", ".json", ".jsonl")))
                return text

            example = call("heldout_example", ROWS_ID)
            assert "read the text of a run's data rows" in example and "Traceback" not in example, example[:400]
            for endpoint in ("heldout_example", "eval_results", "export_zip"):
                text = call(endpoint, ROWS_ID)
                for secret in (ROW_PROMPT[:30], ROW_REFERENCE[:30]):
                    assert secret not in text, (mode_name, endpoint, text[:800])
            scored = call("eval_results", ROWS_ID)
            assert "ROUGE" in scored and "shown to whoever started the run" in scored  # the scores stay, and say why the text is gone
            assert "differs from token 1 of 4" in call("export_zip", ROWS_ID)
            if mode_name == "auth":  # Alice reads the rows of the run she started
                assert "alices prompt 4d2b" in call("heldout_example", ALICE_ID)
                assert "alices reference 8e0f" in call("eval_results", ALICE_ID)
                assert "alices prompt 4d2b" in call("export_zip", ALICE_ID)
    finally:
        import shutil

        shutil.rmtree(owners, ignore_errors=True)
        shutil.rmtree(alices, ignore_errors=True)


def test_paths_shown_on_a_page_are_relative_to_the_run(tmp_path: Path) -> None:
    """What an export or a run's settings tell a signed-in visitor names the run and the file inside it (the path
    owner is runs.shown_path), never the runs folder of the server; the GGUF's README runs in the folder holding it."""
    from phi3_lora import gguf_bundle, ollama
    from phi3_lora.runs import shown_path

    run = RunDir(tmp_path / "srv" / "runs" / "20260101-000000-x")
    run.path.mkdir(parents=True)
    run.config.write_text("{}\n")
    (run.path / "merged").mkdir()
    assert shown_path(run.path / "merged") == "20260101-000000-x/merged"
    assert shown_path(run.path / "gguf-f16" / "m.gguf") == "20260101-000000-x/gguf-f16/m.gguf"
    assert shown_path(run.config) == "20260101-000000-x/config.yaml"
    assert shown_path(tmp_path / "elsewhere" / "upload.yaml") == "upload.yaml"
    commands = ollama.run_commands(Path("m.gguf"), "m")
    readme = gguf_bundle.readme("x", "m.gguf", commands, None)
    assert "\nllama-cli -m m.gguf " in readme and "cd " not in readme and str(tmp_path) not in readme
    assert ollama.run_commands(run.path / "gguf-f16" / "m.gguf", "m")["Ollama"].startswith(f"cd {run.path}/gguf-f16 && ")


def test_readme_sharing_table_is_the_policy() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "## Sharing safely" in readme
    start = readme.index("<!-- generated from phi3_lora/access.py")
    end = readme.index("<!-- end of the generated table -->")
    table = readme[start:end].split("\n", 1)[1].strip()
    assert table == access.policy_table(), "README's table is stale: paste access.policy_table() into it"


# --- what an adapter zip tells whoever downloads it; rows of the bundled sample ----------------------------

ZIP_ID = "20260101-000006-zip"


@pytest.mark.slow
def test_an_adapter_zip_names_no_folder_of_the_server(world: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Any visitor may download any run's adapter zip: its config.yaml, run_summary.json, adapter_config.json and
    model card name the base model folder, the data file and a template file by their names only (the card says
    what was replaced), and the config still loads, so the run can be reproduced with one's own copies."""
    import zipfile

    from gradio_client import Client

    from phi3_lora import export, verify
    from phi3_lora.config import load_yaml, save_yaml

    runs: Path = world["runs"]
    run = RunDir(make_adapter_run(runs, world["model"], ZIP_ID))
    template = world["creds"].parent / "owner-template.jinja"
    cfg = load_yaml(run.config).replace(data={"source": str(world["creds"])},
                                        model={"chat_template": str(template)})
    for path in (run.config, run.adapter / RunDir.CONFIG):
        save_yaml(cfg, path)
    (run.adapter / "run_summary.json").write_text(json.dumps({"model": str(world["model"]), "steps": 1}))
    access.RunStarters(runs).record(ZIP_ID, "owner")
    verified = []

    def verification(path: Path, kind: str, ref: Any, engine: Any = None) -> Any:
        verified.append(path)  # no model loads here (test_export verifies for real)
        return verify.Verification(kind, 1, 1, 4, 4, loaded="x")

    monkeypatch.setattr(export, "verify_adapter_export", verification)
    server_folders = (str(runs), str(world["model"]), str(world["creds"].parent), str(ROOT), str(runs.parent))
    try:
        with serve(world, shared=True) as (url, demo):
            client = Client(url, verbose=False)
            for _ in range(3):  # verifying loads the base model twice: asking again reuses the verification
                zipped, status = client.predict(*endpoint_args(client, "export_zip", Adapter=ZIP_ID),
                                                api_name="/export_zip")
            assert len(verified) == 1 and "1/1" in json.dumps(status), (verified, status)
            groups = {d.get("api_name"): d.get("concurrency_id") for d in demo.config["dependencies"]}
            assert groups["export_zip"] == groups["compare"], groups  # one model-heavy request at a time
            # The download is a copy in gradio's cache; the zip's verification (it quotes the held-out prompts and
            # answers) stays beside the zip under the runs folder, which is never served, and no copy of it is made
            import urllib.error
            import urllib.request

            from phi3_lora.runs import exports_dir

            said, (download, _) = raw_call(url, "export_zip", endpoint_args(client, "export_zip", Adapter=ZIP_ID))
            built = exports_dir(runs, ZIP_ID) / f"{ZIP_ID}-adapter.zip"
            assert built.exists() and built.with_name(built.name + ".verification.json").exists()
            with urllib.request.urlopen(download["url"]) as response:
                assert response.status == 200  # the download itself is served
            for sidecar in (f"{download['path']}.verification.json", f"{built}.verification.json"):
                with pytest.raises(urllib.error.HTTPError):
                    urllib.request.urlopen(f"{url}gradio_api/file={sidecar}")
            assert not list(Path(download["path"]).parent.glob("*.verification.json"))
            status = [status, said]
            with zipfile.ZipFile(zipped) as zf:
                files = {n.split("/", 1)[1]: zf.read(n).decode("utf-8", "replace") for n in zf.namelist()
                         if n.endswith((".md", ".json", ".yaml", ".jinja", ".txt"))}
        for name, text in {**files, "page": json.dumps(status)}.items():
            for folder in server_folders:
                assert folder not in text, (name, folder, text[:600])
        shipped = load_yaml_text(files[RunDir.CONFIG])
        assert shipped.model.name == world["model"].name and shipped.data.source == "creds.csv"
        assert shipped.model.chat_template == "owner-template.jinja" and shipped.lora.r == 2  # the rest as trained
        assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == world["model"].name
        assert json.loads(files["run_summary.json"])["model"] == world["model"].name
        card = files["README.md"]
        assert f"# LoRA adapter for {world['model'].name}" in card and "replaced by names" in card
        assert "point it at your copy of the data" in card
    finally:
        import shutil

        shutil.rmtree(run.path, ignore_errors=True)


def load_yaml_text(text: str) -> Any:
    import tempfile

    from phi3_lora.config import load_yaml

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(text, encoding="utf-8")
        return load_yaml(path)


def test_the_bundled_sample_is_public_by_content_not_by_name() -> None:
    """READ_RUN_DATA gives way for text the bundled sample holds: every row as training reads the sample is public,
    a row with one character changed, a row of other text or no rows at all are not."""
    from types import SimpleNamespace

    from phi3_lora.config import DataSettings
    from phi3_lora.data import load_data
    from phi3_lora.ui.guard import sample_digests

    public = sample_digests(SimpleNamespace(options=SimpleNamespace(sample_dataset=SAMPLE)))
    rows = load_data(DataSettings(source=str(SAMPLE))).rows
    assert access.public_rows(rows, public)
    changed = json.loads(json.dumps(rows[0]))
    changed["messages"][-1]["content"] += "."
    assert not access.public_rows([rows[1], changed], public)
    assert not access.public_rows([{"messages": [{"role": "user", "content": SECRET}]}], public)
    assert not access.public_rows([], public) and not access.public_rows(rows, frozenset())


SAMPLE_RUN_ID, MIXED_ID, NAMED_ID = "20260101-000007-sample", "20260101-000008-mixed", "20260101-000009-named"


@pytest.mark.slow
def test_a_demo_visitor_gets_held_out_examples_of_runs_on_the_bundled_sample_only(world: dict[str, Any]) -> None:
    """Demo mode serves runs trained on the bundled sample: its rows are public, so Held-out example works for any
    visitor there. A run whose held-out rows hold one row of other text, or whose config merely names the sample
    file, is still refused."""
    from gradio_client import Client

    runs: Path = world["runs"]
    lines = [ln for ln in SAMPLE.read_text(encoding="utf-8").splitlines() if ln.strip()]
    private = json.dumps({"messages": [{"role": "user", "content": f"my password is {SECRET}"},
                                       {"role": "assistant", "content": "noted"}]})
    made = []
    for run_id, rows in ((SAMPLE_RUN_ID, lines[:3]), (MIXED_ID, [lines[0], private]), (NAMED_ID, [private])):
        made.append(make_adapter_run(runs, world["model"], run_id))  # each config names the bundled sample
        RunDir(made[-1]).eval_rows.write_text("\n".join(rows) + "\n", encoding="utf-8")
        access.RunStarters(runs).record(run_id, "owner")
    prompts = {json.loads(ln)["messages"][0]["content"] for ln in lines[:3]}
    try:
        with serve(world, demo_mode=True) as (url, demo):
            client = Client(url, verbose=False)

            def example(run_id: str) -> str:
                try:
                    return json.dumps(client.predict(*endpoint_args(client, "heldout_example", Adapter=run_id),
                                                     api_name="/heldout_example"))
                except Exception as exc:
                    return str(exc)

            for _ in range(3):
                shown = example(SAMPLE_RUN_ID)
                assert any(p in shown for p in prompts) and "Reference answer" in shown, shown[:400]
            for run_id in (MIXED_ID, NAMED_ID):
                refused = example(run_id)
                assert "read the text of a run's data rows" in refused and SECRET not in refused, refused[:400]
    finally:
        import shutil

        for path in made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_a_signed_in_visitor_merges_into_one_folder_per_run(world: dict[str, Any]) -> None:
    """Each merge is a 16-bit copy of the whole model on the server's disk: a visitor naming a new folder each time
    would fill it. Visitors merge into the run's 'merged' folder only, refused with what to type before any work."""
    from gradio_client import Client

    _, auth, _, _ = MODES["auth"]
    with serve(world, auth=auth) as (url, demo):
        client = Client(url, auth=auth[0], verbose=False)
        try:
            client.predict(*endpoint_args(client, "export_merged", Adapter=RUN_ID, **{"Folder name": "copy-2"}),
                           api_name="/export_merged")
            refused = ""
        except Exception as exc:
            refused = str(exc)
    assert "merge into the run's folder 'merged' only" in refused and "type merged" in refused, refused[:400]
    assert not (world["runs"] / RUN_ID / "copy-2").exists()


def test_the_forms_names_stand_for_the_servers_files(tmp_path: Path) -> None:
    """ui.names: the form names this session's upload 'upload:<file>', the sample by its checkout path and a default
    model in a server folder by the folder's name; each comes back as the server's file, and nothing else does: a
    name with a path in it, or another session's upload, stays what it is and is gated as such."""
    from types import SimpleNamespace

    from phi3_lora import uploads
    from phi3_lora.access import Requester
    from phi3_lora.ui import names
    from phi3_lora.ui.guard import upload_dir

    runs = tmp_path / "runs"
    mine = uploads.copy_atomic(SAMPLE, uploads.session_dir(runs, "sess1") / "0123456789-mine.jsonl")
    theirs = uploads.copy_atomic(SAMPLE, uploads.session_dir(runs, "sess2") / "9876543210-theirs.jsonl")
    state = SimpleNamespace(options=SimpleNamespace(runs_dir=runs, sample_dataset=SAMPLE),
                            default_name="tiny", default_path=str(tmp_path / "models" / "tiny"))
    who = Requester(access.Level.ANONYMOUS, session="sess1")
    for path, shown in ((mine, "upload:0123456789-mine.jsonl"), (SAMPLE, "data/sample_chat.jsonl")):
        assert names.web_source(state, str(path)) == shown and str(tmp_path) not in shown
        assert names.server_source(state, who, shown) == str(path)
    assert names.web_source(state, "someone/chat-data") == "someone/chat-data"
    def action(name: str) -> access.Action:
        source = names.server_source(state, who, name)
        return access.source_action(source, sample=SAMPLE, uploads=upload_dir(runs, who), is_hub_id=False)
    assert action("upload:0123456789-mine.jsonl") is A.READ_UPLOAD and action("data/sample_chat.jsonl") is A.READ_SAMPLE
    for name in ("upload:../sess2/9876543210-theirs.jsonl", "upload:/etc/passwd", "upload:.hidden", "upload:"):
        assert names.server_source(state, who, name) == name and action(name) is A.READ_SERVER_PATH
    assert not Path(names.server_source(state, who, "upload:" + theirs.name)).exists()  # only this session's
    assert names.web_model(state, state.default_path) == "tiny" and names.server_model(state, "tiny") == state.default_path
    assert names.server_model(state, "org/model") == "org/model" and names.web_model(state, "org/model") == "org/model"


def test_the_client_network_is_what_the_proxies_saw_not_what_the_client_wrote() -> None:
    """Anonymous visitors' shares are per client network (quotas.holder_of): the connection's address, or through a
    proxy in front of the app the address it appended to X-Forwarded-For. Entries a client writes itself come before
    the proxy's and are never read; on a Space its private proxies are skipped; an IPv6 client counts as its /64."""
    net = access.client_network
    assert net("203.0.113.7", ["1.1.1.1"]) == "203.0.113.7"  # no proxy in front: the header is the client's word
    assert net("127.0.0.1", ["6.6.6.6, 203.0.113.7"]) == "203.0.113.7"  # a share link's tunnel appended the last
    assert net("10.16.3.80", ["6.6.6.6, 93.184.216.34, 10.0.0.2"], on_space=True) == "93.184.216.34"
    assert net("10.16.3.80", ["198.51.100.9"]) == "10.16.3.80"  # private peers are proxies on a Space only
    assert net("127.0.0.1", ["[2001:db8:0:1::2]:443"]) == net("2001:db8:0:1::1", []) == "2001:db8:0:1::/64"
    assert net("::ffff:192.0.2.1", []) == "192.0.2.1" and net(None, []) == "unknown"


def _alias_bomb(path: Path, levels: int = 9) -> Path:
    """A 1 KB run.yaml whose model name is nine levels of nine aliases: 9**9 (387 million) values once written out."""
    parts, previous = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]'], "a0"
    for level in range(1, levels):
        parts.append(f"&a{level} [{', '.join([f'*{previous}'] * 9)}]")
        previous = f"a{level}"
    path.write_text(f"model:\n  name: [{', '.join(parts)}]\n")
    return path


def test_a_run_yaml_of_nested_aliases_is_refused_at_once(world: dict[str, Any], tmp_path: Path) -> None:
    """An anonymous visitor loads a 1 KB run.yaml whose aliases stand for 387 million values (a 'billion laughs'):
    refused in a moment with what to do. It held a CPU for good (the check and the message quoting the wrong value
    walked every value) and took the memory with it."""
    from gradio_client import Client, handle_file

    bomb = _alias_bomb(tmp_path / "run.yaml")
    assert bomb.stat().st_size < 1024
    with serve(world, shared=True) as (url, _):
        client = Client(url, verbose=False)
        job = client.submit(*endpoint_args(client, "load_yaml_settings", **{"…or a run.yaml": handle_file(str(bomb))}),
                            api_name="/load_yaml_settings")
        started = time.monotonic()
        try:
            answer = json.dumps(job.result(timeout=60), default=str)
        except Exception as exc:  # the refusal (a gr.Error)
            answer = str(exc)
        assert time.monotonic() - started < 30, answer[:300]
    assert "too large to be a run config once its aliases" in answer and "Traceback" not in answer, answer[:600]
