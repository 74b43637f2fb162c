"""One visitor cannot use up what all visitors share (phi3_lora/quotas.py): each room visitors share (drafts' copies of
uploads, Hub downloads, run folders) gives each identity a share below its total, anonymous visitors one pool below
the total, and the owner no limit; rooms of copies recover by themselves, oldest copies first. Through the real
functions on real folders, and through the real app's API where an endpoint is involved."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import Any

import pytest

from helpers.apps import endpoint_args, free_port
from helpers.fake_hub import FakeModelHub, online
from phi3_lora import quotas, uploads
from phi3_lora.errors import UserError
from phi3_lora.quotas import ANONYMOUS, Held, Limits

KB = 2**10
# Small rooms: a share holds two 40 KiB copies, the anonymous pool four, the total eight.
SMALL = Limits(drafts_total=320 * KB, drafts_share=100 * KB, drafts_anonymous=200 * KB, draft_expiry_s=3600)


def _upload(folder: Path, name: str, kib: int = 40) -> Path:
    path = folder / name
    path.write_bytes(b"x" * (kib * KB))
    return path


def _age(runs: Path, token: str, seconds: float) -> None:
    """Make a draft's copy `seconds` old (its file's mtime is when it was last written or restored)."""
    for p in uploads.draft_dir(runs, token).iterdir():
        then = time.time() - seconds
        os.utime(p, (then, then))


def _drafts_of(runs: Path, holder: str) -> set[str]:
    return {h.key for h in uploads.drafts_held(runs) if h.holder == holder}


# --- the arithmetic -------------------------------------------------------------------------------------------

def test_expiry_plan_removes_the_oldest_that_may_go_and_no_more() -> None:
    room = SMALL.drafts()
    now = 10_000.0
    held = [Held("old", ANONYMOUS, 100 * KB, now - 7200), Held("older", "auth:bob", 100 * KB, now - 9000),
            Held("fresh", ANONYMOUS, 100 * KB, now - 60)]
    # the total (320) is passed by 40 more: only the oldest entry goes, bob's, though it is not the asker's
    assert [h.key for h in quotas.expiry_plan(room, held, "auth:carol", 40 * KB, now)] == ["older"]
    # nothing old enough: no plan, and the refusal says which limit and how full
    young = [Held(str(i), ANONYMOUS, 50 * KB, now - 10) for i in range(4)]
    assert quotas.expiry_plan(room, young, ANONYMOUS, 40 * KB, now) is None
    assert "all anonymous visitors together have 200 KiB of drafts" in str(
        quotas.room_refusal(room, quotas.usage(young), ANONYMOUS, 40 * KB, "A draft"))
    # a signed-in visitor's own share gives way at any age, oldest first, and the pool's other holders are untouched
    mine = [Held("a", "auth:al", 50 * KB, now - 20), Held("b", "auth:al", 50 * KB, now - 10),
            Held("c", ANONYMOUS, 50 * KB, now - 9999)]
    assert [h.key for h in quotas.expiry_plan(room, mine, "auth:al", 40 * KB, now)] == ["a"]


# --- drafts on a real folder ---------------------------------------------------------------------------------

def test_one_visitor_filling_their_drafts_share_cannot_block_a_second(tmp_path: Path) -> None:
    """alice saves draft after draft (a new browser token each time): her copies stay within her share, her newest
    kept, and bob's draft still gets its copy. Without the share alice's copies fill the total and bob is refused."""
    runs = tmp_path / "runs"
    for i in range(8):
        uploads.keep_for_draft(_upload(tmp_path, f"a{i}.jsonl"), runs, f"alice{i}", "auth:alice", SMALL)
        time.sleep(0.01)  # distinct mtimes: the newest is known
    alice = _drafts_of(runs, "auth:alice")
    assert alice == {"alice6", "alice7"}, alice
    bob = uploads.keep_for_draft(_upload(tmp_path, "b.jsonl"), runs, "bob1", "auth:bob", SMALL)
    assert bob.is_file()
    # an expired copy says what happened when its browser restores it
    with pytest.raises(UserError, match="gave way to newer drafts") as info:
        uploads.restore_draft(runs, "alice0", "a0.jsonl", "session1")
    assert "Upload the file again" in str(info.value)


def test_anonymous_visitors_share_one_pool_that_leaves_room_for_signed_in_visitors_and_the_owner(
        tmp_path: Path) -> None:
    """A reload gives an anonymous visitor a new session and a new draft token, so each anonymous copy counts in one
    pool: a client that fills it is refused there (the message says to sign in), while a signed-in visitor and the
    owner still save theirs."""
    runs = tmp_path / "runs"
    for i in range(6):
        try:
            uploads.keep_for_draft(_upload(tmp_path, f"n{i}.jsonl"), runs, f"anon{i}", ANONYMOUS, SMALL)
        except UserError as exc:
            refused = str(exc)
    assert len(_drafts_of(runs, ANONYMOUS)) == 5 and "Sign in" in refused, refused
    assert "all anonymous visitors together have 200 KiB of drafts" in refused
    assert uploads.keep_for_draft(_upload(tmp_path, "s.jsonl"), runs, "signed", "auth:sam", SMALL).is_file()
    # the owner is never counted: not refused however full the room, and not counted against the visitors
    for i in range(6):
        assert uploads.keep_for_draft(_upload(tmp_path, f"o{i}.jsonl"), runs, f"owner{i}", None, SMALL).is_file()
    assert uploads.keep_for_draft(_upload(tmp_path, "t.jsonl"), runs, "signed2", "auth:tom", SMALL).is_file()


def test_a_full_room_of_drafts_recovers_by_itself_keeping_the_newest(tmp_path: Path) -> None:
    """Visitors' copies fill the total; a new one makes room by removing copies older than the bound, oldest first,
    and keeps every newer one; without copies old enough, it is refused with the reason."""
    runs = tmp_path / "runs"
    holders = ["auth:a", "auth:b", "auth:c", "auth:d"]
    for i, holder in enumerate(holders * 2):  # 8 x 40 KiB = the 320 KiB total
        token = f"d{i}"
        uploads.keep_for_draft(_upload(tmp_path, f"{token}.jsonl"), runs, token, holder, SMALL)
        _age(runs, token, 90_000 - 10_000 * i)  # d0 the oldest (25 h) ... d7 (6 h); d0..d6 past the hour
    with pytest.raises(UserError, match="room for drafts is full \\(320 KiB of 320 KiB\\)"):
        uploads.keep_for_draft(_upload(tmp_path, "e.jsonl"), runs, "e", "auth:e",
                               dataclasses.replace(SMALL, draft_expiry_s=30 * 3600))  # none is old enough
    assert len(uploads.drafts_held(runs)) == 8
    uploads.keep_for_draft(_upload(tmp_path, "e.jsonl", kib=70), runs, "e", "auth:e", SMALL)
    kept = {h.key for h in uploads.drafts_held(runs)}
    assert kept == {"d2", "d3", "d4", "d5", "d6", "d7", "e"}, kept  # the two oldest went, no more
    with pytest.raises(UserError, match="gave way"):
        uploads.restore_draft(runs, "d0", "d0.jsonl", "session2")


# --- session uploads ----------------------------------------------------------------------------------------------

def test_a_visitor_reloading_for_new_sessions_cannot_fill_the_uploads_of_everybody(tmp_path: Path) -> None:
    """Each reload is a new session with 512 MiB of its own, so one visitor used to fill the 4 GiB of every session's
    uploads. Sessions count for their holder: alice stops at her share, anonymous visitors at their pool, and bob and
    the owner still upload."""
    runs = tmp_path / "runs"
    limits = Limits(uploads_share=100 * KB, uploads_anonymous=200 * KB)
    store = lambda key, holder: uploads.store(_upload(tmp_path, f"{key}.jsonl"), runs, key,  # noqa: E731
                                              total_quota=320 * KB, holder=holder, limits=limits)
    store("alice1", "auth:alice"), store("alice2", "auth:alice")
    with pytest.raises(UserError, match="you have 80 KiB of uploads on this server, and the limit is 100 KiB"):
        store("alice3", "auth:alice")
    for i in range(5):
        store(f"anon{i}", ANONYMOUS)
    with pytest.raises(UserError, match="all anonymous visitors together have 200 KiB of uploads.*Sign in"):
        store("anon5", ANONYMOUS)
    assert store("bob1", "auth:bob").is_file()
    assert store("owner1", None).is_file() and store("owner2", None).is_file()  # not counted, never refused


# --- Hub downloads on a real cache folder ------------------------------------------------------------------------

GiB = 2**30
ROOMY_DISK = Limits(disk_reserve=0, downloads_total=64 * GiB, downloads_share=16 * GiB,
                    downloads_anonymous=32 * GiB, download_expiry_s=7 * 24 * 3600)


def _cached(key: str, size: int = 10) -> None:
    """A repo in the Hub cache as huggingface_hub lays it out (its bytes on disk are few: the ledger counts what
    its file list said)."""
    from phi3_lora import downloads

    folder = downloads.cache_folder(key) / "snapshots" / ("1" * 40)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(b"\0" * size)


def test_one_visitors_downloads_stay_in_their_share_and_the_owner_is_never_counted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each model, adapter or dataset a visitor makes this machine download counts for them: alice is refused past her
    16 GiB share, bob still downloads his; an anonymous client stops at its quarter of the anonymous pool, anonymous
    visitors together at the 32 GiB pool; the owner is not checked. A repo already cached costs nobody more."""
    import huggingface_hub.constants

    from phi3_lora import downloads

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    runs = tmp_path / "runs"
    runs.mkdir()
    check = lambda holder, key, size: downloads.check_room(runs, holder, key, size, ROOMY_DISK)  # noqa: E731
    check("auth:alice", "model:big/one", 15 * GiB)
    with pytest.raises(UserError, match="you have 15.0 GiB of downloads on this server, and the limit is 16.0 GiB"):
        check("auth:alice", "dataset:someone/chat", 2 * GiB)
    check("auth:bob", "dataset:someone/chat", 2 * GiB)
    check("auth:alice", "model:big/one", 15 * GiB)  # the same repo again (its download under way): no new cost
    _cached("dataset:someone/chat")
    check("auth:alice", "dataset:someone/chat", 2 * GiB)  # bob's download, cached now: alice uses it for nothing
    for i in range(4):  # four anonymous clients, each at its quarter of the pool
        check(f"{ANONYMOUS}:c{i}", f"model:anon/m{i}", 8 * GiB)
    with pytest.raises(UserError, match="visitors from your network address have 8.0 GiB of downloads.*may keep "
                                        "8.0 GiB.*Sign in"):
        check(f"{ANONYMOUS}:c0", "model:anon/more", 1 * GiB)
    with pytest.raises(UserError, match="all anonymous visitors together have 32.0 GiB.*Sign in"):
        check(f"{ANONYMOUS}:c4", "model:anon/m4", 1 * GiB)
    check(None, "model:owner/huge", 500 * GiB)  # the owner: never refused, never counted
    check("auth:carol", "model:carol/m", 15 * GiB)  # 15 + 2 + 32 + 15 = the 64 GiB
    with pytest.raises(UserError, match="room for downloads is full"):
        check("auth:dave", "model:dave/m", 4 * GiB)


def test_a_full_room_of_downloads_gives_up_the_oldest_unused_ones(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Visitors' downloads fill the total; a new one removes, oldest first, the downloads no request used for a week
    (copies of what the Hub keeps) and no more; the newer ones stay in the cache."""
    import huggingface_hub.constants

    from phi3_lora import downloads

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    runs = tmp_path / "runs"
    runs.mkdir()
    day, now = 24 * 3600, time.time()
    for holder, age in (("auth:a", 10), ("auth:b", 9), ("auth:c", 8), ("auth:d", 5)):  # 4 x 16 GiB: the total
        key = f"model:{holder[5:]}/m"
        downloads.check_room(runs, holder, key, 16 * GiB, ROOMY_DISK, now=now - age * day)
        _cached(key)
    downloads.check_room(runs, "auth:a", "model:a/m", 16 * GiB, ROOMY_DISK, now=now - 6 * day)  # a used since
    downloads.check_room(runs, "auth:e", "model:e/m", 16 * GiB, ROOMY_DISK, now=now)
    cached = {k for k in ("model:a/m", "model:b/m", "model:c/m", "model:d/m") if downloads.is_cached(k)}
    assert cached == {"model:a/m", "model:c/m", "model:d/m"}, cached  # b, the oldest unused, went; no more
    _cached("model:e/m")
    downloads.check_room(runs, "auth:f", "model:f/m", 16 * GiB, ROOMY_DISK, now=now)  # c (8 days) goes next
    _cached("model:f/m")
    assert not downloads.is_cached("model:c/m")
    # nothing unused for a week is left to give way: the next one is refused, and the room stays as it was
    with pytest.raises(UserError, match="room for downloads is full"):
        downloads.check_room(runs, "auth:g", "model:g/m", 16 * GiB, ROOMY_DISK, now=now)
    assert all(downloads.is_cached(f"model:{x}/m") for x in "adef")


# --- through the real app: two signed-in visitors ----------------------------------------------------------------

SERVED = Limits(drafts_total=8 * 2**20, drafts_share=2**20, drafts_anonymous=4 * 2**20, disk_reserve=0,
                downloads_share=512 * 2**20, runs_share=64 * 2**20, uploads_share=2**20)
USERS = [("alice", "alice-pass"), ("bob", "bob-pass")]


@pytest.fixture(scope="module")
def signed_in_app(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path):
    """The app under --auth with alice and bob, and small rooms (the options are the owner's to change)."""
    from phi3_lora.ui import AppOptions, build_app, launch

    runs = tmp_path_factory.mktemp("runs")
    options = AppOptions(runs_dir=runs, default_model=str(tiny_llama_dir), limits=SERVED)
    demo = build_app(options=options)
    _, url, _ = launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True, auth=USERS)
    yield url, runs, options
    demo.close()


def _answer(c: Any, *args: Any, api_name: str) -> str:
    """What an endpoint answers `c`, as text: its result, or the refusal (a gr.Error reaches the client as an error)."""
    try:
        return str(c.predict(*args, api_name=api_name))
    except Exception as exc:  # the refusal
        return str(exc)


def _signed_in(url: str, user: str) -> Any:
    from gradio_client import Client

    return Client(url, auth=(user, dict(USERS)[user]), verbose=False)


def _save_draft(c: Any, source: str, token: str) -> dict[str, Any]:
    args = endpoint_args(c, "save_draft", **{"Data source": source})
    return c.predict({"token": token}, *args[1:], api_name="/save_draft")


def test_a_signed_in_visitor_saving_drafts_without_end_cannot_block_another(signed_in_app, tmp_path: Path) -> None:
    """alice's client sends a new draft token with every save (the token is the browser's), each saving a copy of her
    400 KiB upload: her copies stay within her 1 MiB share, her newest kept, and bob's draft keeps his copy."""
    from gradio_client import handle_file

    url, runs, _ = signed_in_app
    alice, bob = _signed_in(url, "alice"), _signed_in(url, "bob")
    kept = alice.predict(handle_file(str(_upload(tmp_path, "mine.jsonl", kib=400))), api_name="/upload_dataset")
    saved = [_save_draft(alice, kept, f"alice{i}") for i in range(8)]
    assert all(s["data"].get("upload") for s in saved), saved  # her own older copies gave way to her newer ones
    assert _drafts_of(runs, "auth:alice") == {"alice6", "alice7"}
    theirs = bob.predict(handle_file(str(_upload(tmp_path, "his.jsonl", kib=400))), api_name="/upload_dataset")
    mine = _save_draft(bob, theirs, "bob1")
    assert mine["data"].get("upload") and _drafts_of(runs, "auth:bob") == {"bob1"}, mine
    # alice's browser that held the first draft finds out what happened when it restores it
    note = alice.predict(saved[0], api_name="/restore_draft")[-1]
    assert "gave way to newer drafts" in str(note), note


def test_a_visitors_hub_datasets_count_in_their_share_and_not_in_anothers(signed_in_app, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Each Hub dataset is checked alone (at most 512 MiB), but a visitor could name one after another. Validating one
    counts its file list's bytes for the visitor: alice's second 300 MiB dataset passes her 512 MiB share and is
    refused before a byte of it downloads; bob validates the same dataset: his share is his own."""
    url, runs, _ = signed_in_app
    chat = {"README.md": 100, "data/train-00000-of-00001.parquet": 300 * 2**20}
    hub = online(FakeModelHub({"someone/chat-a": chat, "someone/chat-b": chat}), tmp_path, monkeypatch)
    alice, bob = _signed_in(url, "alice"), _signed_in(url, "bob")

    def validate(c: Any, dataset: str) -> str:
        return _answer(c, *endpoint_args(c, "validate", **{"Data source": dataset}), api_name="/validate")

    try:
        first = validate(alice, "someone/chat-a")  # counted (the zeros it downloads are no parquet: no rows)
        second = validate(alice, "someone/chat-b")
        asked = len(hub.seen)
        theirs = validate(bob, "someone/chat-b")
    finally:
        hub.close()
    assert "does not fit" not in first, first[:500]
    assert "Downloading someone/chat-b (300 MiB) does not fit: you have 300 MiB of downloads" in second, second[:500]
    assert "the limit is 512 MiB" in second
    assert not [r for r in hub.seen[:asked] if "someone/chat-b/resolve/" in r], hub.seen
    assert "does not fit" not in theirs, theirs[:500]


# --- runs: a signed-in visitor's run folders ---------------------------------------------------------------------

def _alices_run(runs: Path, model_dir: Path, run_id: str) -> Path:
    """A finished adapter run in `runs` that the signed-in alice started (it counts on her runs share)."""
    from helpers.run_folders import make_adapter_run
    from phi3_lora.access import RunStarters

    run_dir = make_adapter_run(runs, model_dir, run_id)
    RunStarters(runs).record(run_dir.name, "auth:alice")
    return run_dir


def _sparse(folder: Path, size: int) -> None:
    """A file of `size` bytes that takes no room on this machine's disk (what quotas count is the size)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "model.safetensors", "wb") as fh:
        fh.truncate(size)


def test_runs_count_for_who_started_them_and_merges_for_who_made_them(tmp_path: Path) -> None:
    """alice's run counts for her, less the merge bob made inside it, which counts for bob."""
    from phi3_lora.access import RunStarters
    from phi3_lora.runs import RunDir

    runs = tmp_path / "runs"
    for run_id, who in (("20260101-000000-a", "auth:alice"), ("20260101-000001-b", "auth:bob")):
        (runs / run_id).mkdir(parents=True)
        (runs / run_id / RunDir.CONFIG).write_text("{}\n")
        _sparse(runs / run_id / "checkpoints" / "checkpoint-1", 3 * 2**20)
        RunStarters(runs).record(run_id, who)
    _sparse(runs / "20260101-000000-a" / "merged", 10 * 2**20)
    RunStarters(runs).record("20260101-000000-a/merged", "auth:bob")
    starters = RunStarters(runs).all()
    alice = quotas.run_bytes_of(runs, "auth:alice", starters)
    bob = quotas.run_bytes_of(runs, "auth:bob", starters)
    assert set(alice) == {"20260101-000000-a"} and 3 * 2**20 < alice["20260101-000000-a"] < 4 * 2**20, alice
    assert bob["20260101-000000-a/merged"] == 10 * 2**20 and set(bob) == {"20260101-000000-a/merged",
                                                                          "20260101-000001-b"}, bob
    refused = quotas.runs_refusal(bob, 12 * 2**20, "a merge")
    assert refused is not None and "so a merge is refused" in str(refused)
    assert "Delete runs or merged copies" in str(refused) and "20260101-000000-a/merged (10 MiB)" in str(refused)
    assert quotas.runs_refusal(alice, 12 * 2**20, "a merge") is None


def test_a_signed_in_visitor_past_their_runs_share_is_refused_with_what_to_delete(signed_in_app, tiny_llama_dir: Path,
                                                                                   tmp_path: Path) -> None:
    """alice's runs fill her share: Start and Resume are refused before any work with a message naming her largest
    run; bob, with runs of his own, is not refused for alice's use; alice cannot delete bob's run, deletes hers with
    Delete run, and her share is free again."""
    from helpers.apps import SAMPLE, start_args
    from helpers.run_folders import make_adapter_run
    from phi3_lora.access import RunStarters

    url, runs, options = signed_in_app
    state_starters = RunStarters(runs)
    make_adapter_run(runs, tiny_llama_dir, "20260102-000000-alice")
    _sparse(runs / "20260102-000000-alice" / "merged", 80 * 2**20)
    state_starters.record("20260102-000000-alice", "auth:alice")
    make_adapter_run(runs, tiny_llama_dir, "20260102-000000-bob")
    state_starters.record("20260102-000000-bob", "auth:bob")
    alice, bob = _signed_in(url, "alice"), _signed_in(url, "bob")

    started = _answer(alice, *start_args(alice, **{"Data source": str(SAMPLE)}), api_name="/start_training")
    assert "Your runs and exports take" in started and "so starting a run is refused" in started, started[:600]
    assert "Delete run" in started and "20260102-000000-alice" in started
    resumed = _answer(alice, "20260102-000000-alice", api_name="/resume_training")
    assert "so resuming 20260102-000000-alice is refused" in resumed, resumed[:600]
    theirs = _answer(bob, "20260102-000000-bob", api_name="/resume_training")
    assert "Your runs and exports take" not in theirs, theirs[:600]  # refused or not, never for alice's use
    assert "only for runs they started" in _answer(alice, "20260102-000000-bob", api_name="/delete_run")
    assert (runs / "20260102-000000-bob").is_dir()
    from phi3_lora.ui.train_tab import DELETE_CANCELLED

    _answer(alice, DELETE_CANCELLED, api_name="/delete_run")  # what the page sends when its confirmation is declined
    assert (runs / "20260102-000000-alice").is_dir()
    _answer(alice, "20260102-000000-alice", api_name="/delete_run")
    assert not (runs / "20260102-000000-alice").exists()
    assert quotas.run_bytes_of(runs, "auth:alice", state_starters.all()) == {}


def test_a_signed_in_visitor_opening_session_after_session_cannot_block_another_upload(signed_in_app,
                                                                                       tmp_path: Path) -> None:
    """alice opens new sessions (each with a quota of its own) and uploads in each until her share is full; bob's
    upload is still taken."""
    from gradio_client import handle_file

    url, runs, _ = signed_in_app
    data = handle_file(str(_upload(tmp_path, "big.jsonl", kib=400)))
    answers = []
    # Every session stays open (its client kept): a client let go ends its session, whose uploads then go (the app's
    # unload), so on a slow machine alice's first upload could be gone before her third and the third was taken.
    sessions = [_signed_in(url, "alice") for _ in range(4)]
    for session in sessions:
        answers.append(_answer(session, data, api_name="/upload_dataset"))
    assert "you have 800 KiB of uploads on this server, and the limit is 1 MiB" in answers[2], answers
    # a name of its own: an earlier test of this module's server uploaded "his.jsonl" (same bytes) into a session
    bobs = _signed_in(url, "bob").predict(handle_file(str(_upload(tmp_path, "his-other.jsonl", kib=400))),
                                          api_name="/upload_dataset")
    assert bobs.startswith("upload:")  # the form's name of it (ui.names); the file is in bob's session folder
    assert len(list((runs / ".uploads" / "sessions").glob(f"*/{bobs.split(':', 1)[1]}"))) == 1


# --- copies of uploads kept for runs -------------------------------------------------------------------------------

def _run_on(runs: Path, run_id: str, source: Path, starter: str | None) -> None:
    """A run folder whose config trains on `source`, started by `starter`."""
    from phi3_lora.access import RunStarters
    from phi3_lora.config import RunConfig, save_yaml
    from phi3_lora.runs import RunDir

    run = RunDir(runs / run_id)
    run.path.mkdir(parents=True)
    save_yaml(RunConfig().replace(data={"source": str(source)}), run.config)
    RunStarters(runs).record(run_id, starter)


def test_copies_of_uploads_kept_for_runs_count_for_who_started_them_and_go_with_the_last_run(tmp_path: Path) -> None:
    """A run started from an upload keeps a copy of it (runs/.uploads/kept) for Resume. The copy counts for whoever
    started a run on it, once however many of their runs train on it, never for the owner; deleting a run removes the
    copy only once no run trains on it, and says so in the bytes freed."""
    from phi3_lora import jobs
    from phi3_lora.access import RunStarters

    runs = tmp_path / "runs"
    kept = uploads.root(runs) / uploads.KEPT
    _sparse(kept, 5 * 2**20)
    mine = (kept / "model.safetensors").rename(kept / "0123456789-mine.jsonl")
    _sparse(kept, 7 * 2**20)
    theirs = (kept / "model.safetensors").rename(kept / "abcdef0123-theirs.jsonl")
    _run_on(runs, "20260104-000000-a1", mine, "auth:alice")
    _run_on(runs, "20260104-000001-a2", mine, "auth:alice")
    _run_on(runs, "20260104-000002-b", theirs, "auth:bob")
    _run_on(runs, "20260104-000003-o", theirs, "owner")
    starters = RunStarters(runs).all()
    held = {(h.key, h.holder): h.size for h in uploads.kept_held(runs, starters)}
    assert held == {(mine.name, "auth:alice"): 5 * 2**20, (theirs.name, "auth:bob"): 7 * 2**20}, held
    jobs.delete_run("20260104-000000-a1", runs)
    assert mine.is_file()  # alice's second run still trains on it
    freed = jobs.delete_run("20260104-000001-a2", runs)
    assert not mine.exists() and freed >= 5 * 2**20
    jobs.delete_run("20260104-000002-b", runs)
    assert theirs.is_file()  # the owner's run trains on it: it stays, counted for nobody
    assert uploads.kept_held(runs, starters) == []


def test_a_kept_upload_counts_in_the_runs_share_and_a_refused_start_keeps_no_copy(signed_in_app, tiny_llama_dir: Path,
                                                                                  tmp_path: Path) -> None:
    """alice's run trains on a 70 MiB upload kept for it: her runs share (64 MiB) is full by that copy alone, so a
    Resume is refused naming it. And a Start from a new upload that her share refuses leaves no copy of it behind:
    each such refusal used to keep one for good, counted for nobody."""
    from gradio_client import handle_file

    from helpers.apps import SAMPLE, start_args
    from helpers.run_folders import make_adapter_run
    from phi3_lora.access import RunStarters
    from phi3_lora.config import load_yaml, save_yaml
    from phi3_lora.runs import RunDir

    url, runs, _ = signed_in_app
    kept = uploads.root(runs) / uploads.KEPT
    _sparse(kept, 70 * 2**20)
    big = (kept / "model.safetensors").rename(kept / "feedc0ffee-big.jsonl")
    run = RunDir(make_adapter_run(runs, tiny_llama_dir, "20260104-000000-alice-kept"))
    save_yaml(load_yaml(run.config).replace(data={"source": str(big)}), run.config)
    RunStarters(runs).record(run.run_id, "auth:alice")
    alice = _signed_in(url, "alice")
    call = functools.partial(_answer, alice)

    resumed = call(run.run_id, api_name="/resume_training")
    assert f"so resuming {run.run_id} is refused" in resumed, resumed[:600]
    assert "upload big.jsonl (kept for your runs) (70 MiB)" in resumed and "goes with the last of them" in resumed
    before = set(kept.iterdir())
    small = tmp_path / "small.jsonl"
    small.write_text("".join(SAMPLE.read_text(encoding="utf-8").splitlines(keepends=True)[:5]), encoding="utf-8")
    source = alice.predict(handle_file(str(small)), api_name="/upload_dataset")
    started = call(*start_args(alice, **{"Data source": source}), api_name="/start_training")
    assert "so starting a run is refused" in started, started[:600]
    assert set(kept.iterdir()) == before  # no copy of small.jsonl kept for a run that never started
    call(run.run_id, api_name="/delete_run")
    assert not run.path.exists() and not big.exists()  # the copy went with the last run that trained on it


def test_a_merge_or_gguf_that_would_pass_the_runs_share_by_its_own_size_is_refused_before_it_starts(
        signed_in_app, tiny_llama_dir: Path) -> None:
    """alice keeps 50 MiB of her 64 MiB share; the merge of her run would add ~23 MiB (the base's weights in 16-bit,
    from its config, plus its tokenizer files): refused before any work, with how much it needs and what to delete.
    The check used to count only what she held, so one export could pass the share by its whole size. A GGUF export
    likewise."""
    url, runs, _ = signed_in_app
    run_dir = _alices_run(runs, tiny_llama_dir, "20260104-000000-alice-merge")
    _sparse(run_dir / "checkpoints" / "checkpoint-9", 50 * 2**20)
    alice = _signed_in(url, "alice")
    call = functools.partial(_answer, alice)

    try:
        merged = call(*endpoint_args(alice, "export_merged", Adapter=run_dir.name), api_name="/export_merged")
        assert "and this needs about" in merged and "so a merge is refused" in merged, merged[:600]
        assert "Delete run" in merged and "Traceback" not in merged
        assert not (run_dir / "merged").exists() and not list(run_dir.glob(".merged*"))
        gguf = call(*endpoint_args(alice, "export_gguf", Adapter=run_dir.name), api_name="/export_gguf")
        assert "so a GGUF export is refused" in gguf, gguf[:600]
        assert not list(run_dir.glob("*gguf*"))
    finally:
        call(run_dir.name, api_name="/delete_run")


def test_a_gguf_export_is_checked_against_its_peak_the_temporary_merge_and_the_gguf_together(
        signed_in_app, tiny_llama_dir: Path) -> None:
    """A GGUF export writes a 16-bit merge, then the GGUF from it, and keeps both until the GGUF is verified. alice has
    room for the GGUF alone but not for both: refused before any work, with the peak it needs. The check used to count
    the GGUF alone, so an export could hold about twice what its check allowed."""
    from phi3_lora import estimate, export, models
    from phi3_lora.access import RunStarters

    url, runs, options = signed_in_app
    run_dir = _alices_run(runs, tiny_llama_dir, "20260104-000000-alice-gguf-peak")
    shape = estimate.model_shape(models.model_info(str(tiny_llama_dir)).config)
    gguf_alone = estimate.export_bytes(shape, "f16") + export.EXPORT_EXTRA_BYTES
    peak = export.expected_export_bytes(run_dir, "f16")
    held = sum(quotas.run_bytes_of(runs, "auth:alice", RunStarters(runs).all()).values())
    _sparse(run_dir / "checkpoints" / "checkpoint-9", options.limits.runs_share - held - gguf_alone - 2**20)
    alice = _signed_in(url, "alice")
    call = functools.partial(_answer, alice)

    try:
        gguf = call(*endpoint_args(alice, "export_gguf", Adapter=run_dir.name), api_name="/export_gguf")
        assert "so a GGUF export is refused" in gguf and f"needs about {quotas.size_text(peak)} more" in gguf, gguf[:600]
        assert not list(run_dir.glob("*gguf*")) and not list(run_dir.glob("*tmp*"))
        assert peak >= gguf_alone + estimate.export_bytes(shape, "merged") + 2**20  # what was refused: the merge too
    finally:
        call(run_dir.name, api_name="/delete_run")


def test_a_merged_push_is_checked_against_the_runs_share_like_a_merge(signed_in_app, tiny_llama_dir: Path) -> None:
    """Push merged merges into the run's 'merged' folder, which stays on this disk: alice, without room for the merge,
    is refused before any work (it skipped the check, and the folder counted for whoever started the run)."""
    url, runs, _ = signed_in_app
    run_dir = _alices_run(runs, tiny_llama_dir, "20260104-000000-alice-push")
    _sparse(run_dir / "checkpoints" / "checkpoint-9", 50 * 2**20)
    alice = _signed_in(url, "alice")
    call = functools.partial(_answer, alice)
    try:
        pushed = call(*endpoint_args(alice, "push_to_hub", Adapter=run_dir.name, **{
            "Repo id": "alice/merged", "Push": "merged", "Hugging Face token": "hf_alices_own"}), api_name="/push_to_hub")
        assert "so a merged push is refused" in pushed and "Delete run" in pushed, pushed[:600]
        assert not (run_dir / "merged").exists() and not list(run_dir.glob(".merged*"))
    finally:
        call(run_dir.name, api_name="/delete_run")


def test_a_plain_push_is_checked_against_the_runs_share_before_it_starts(signed_in_app, tiny_llama_dir: Path) -> None:
    """A plain push keeps its verified adapter zip and the folder it unpacks to in <run>/push/, counted for the pusher:
    alice, 8 MiB short of her share, is refused before the zip is built (it was counted only after it was written)."""
    from phi3_lora.export import expected_push_bytes
    from phi3_lora.quotas import folder_bytes

    url, runs, _ = signed_in_app
    run_dir = _alices_run(runs, tiny_llama_dir, "20260104-000001-alice-plain-push")
    _sparse(run_dir / "checkpoints" / "checkpoint-9", SERVED.runs_share - folder_bytes(run_dir) - 8 * 2**20)
    assert expected_push_bytes(run_dir) > 8 * 2**20
    alice = _signed_in(url, "alice")
    call = functools.partial(_answer, alice)
    try:
        pushed = call(*endpoint_args(alice, "push_to_hub", Adapter=run_dir.name, **{
            "Repo id": "alice/adapter", "Hugging Face token": "hf_alices_own"}), api_name="/push_to_hub")
        assert "so a push is refused" in pushed and "Delete run" in pushed, pushed[:600]
        assert not (run_dir / "push").exists()
    finally:
        call(run_dir.name, api_name="/delete_run")


def test_an_exports_temporary_counts_for_who_made_the_export(tmp_path: Path) -> None:
    """While a merge writes it, the 16-bit copy lies beside its folder (runs.temporary_of): it counts for whoever the
    merged folder counts for, bob, not for alice who started the run; a temporary of nothing recorded stays hers."""
    from phi3_lora.access import RunStarters
    from phi3_lora.runs import RunDir, temporary_of

    runs = tmp_path / "runs"
    run = runs / "20260101-000000-a"
    run.mkdir(parents=True)
    (run / RunDir.CONFIG).write_text("{}\n")
    _sparse(run / "checkpoints" / "checkpoint-1", 3 * 2**20)
    _sparse(temporary_of(run / "merged"), 10 * 2**20)  # the merge under way: its folder does not exist yet
    _sparse(run / ".other.tmp-4242", 2**20)
    RunStarters(runs).record(run.name, "auth:alice")
    RunStarters(runs).record(f"{run.name}/merged", "auth:bob")
    starters = RunStarters(runs).all()
    assert quotas.run_bytes_of(runs, "auth:bob", starters) == {f"{run.name}/merged": 10 * 2**20}
    alice = quotas.run_bytes_of(runs, "auth:alice", starters)[run.name]
    assert 4 * 2**20 < alice < 5 * 2**20, alice


class _PushHub:
    """A Hub that creates any repo and then knows none (the upload fails): what a push writes on this disk stays."""

    def __init__(self) -> None:
        import json
        from http.server import BaseHTTPRequestHandler

        from helpers.local_http import NOT_FOUND, LocalServer, read_body, send_json

        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                read_body(self)
                if self.command == "POST" and self.path.startswith("/api/repos/create"):
                    send_json(self, 200, json.dumps({"url": f"{hub.url}/bob/pushed", "name": "bob/pushed"}).encode())
                else:
                    send_json(self, 404, NOT_FOUND)

            do_GET = do_POST = do_HEAD = do_PUT = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self._served = LocalServer(Handler)
        self.url = self._served.url

    def close(self) -> None:
        self._served.close()


@pytest.mark.slow
def test_a_plain_push_and_a_merge_count_for_who_made_them_while_and_after_they_work(
        signed_in_app, tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bob pushes alice's adapter (its verified zip stays in <run>/push/) and merges her run (the 16-bit copy lies in
    <run>/.merged.tmp-<pid> until it is verified): both counted for alice, whose run it is, not for bob. Now each
    counts for bob, the merge's temporary from its start, as a GGUF export's temporary merge already did."""
    from gradio_client.utils import Status

    from phi3_lora.access import RunStarters
    from phi3_lora.quotas import folder_bytes

    url, runs, _ = signed_in_app
    run_dir = _alices_run(runs, tiny_llama_dir, "20260104-000000-alice-lent")
    bob = _signed_in(url, "bob")
    hub = online(_PushHub(), tmp_path, monkeypatch)
    try:
        pushed = _answer(bob, *endpoint_args(bob, "push_to_hub", Adapter=run_dir.name, **{
            "Repo id": "bob/pushed", "Hugging Face token": "hf_bobs_own"}), api_name="/push_to_hub")
        assert "Could not push to the Hub" in pushed, pushed[:600]
        assert list((run_dir / "push").glob("*-adapter.zip")), "the push's verified zip stays in the run"
        held = quotas.run_bytes_of(runs, "auth:bob", RunStarters(runs).all())
        assert held[f"{run_dir.name}/push"] == folder_bytes(run_dir / "push") > 0, held

        merge = bob.submit(*endpoint_args(bob, "export_merged", Adapter=run_dir.name), api_name="/export_merged")
        seen = None
        while seen is None and not merge.done():
            temporary = next((t for t in run_dir.glob(".merged.tmp-*") if (t / "config.json").exists()), None)
            if temporary is not None:
                starters = RunStarters(runs).all()
                size = folder_bytes(temporary)
                bobs = quotas.run_bytes_of(runs, "auth:bob", starters)
                alices = quotas.run_bytes_of(runs, "auth:alice", starters)
                if temporary.exists():  # not renamed into place meanwhile: one consistent look
                    seen = size, bobs, alices
            time.sleep(0.05)
        merge.result(timeout=600)
        assert merge.status().code == Status.FINISHED
        assert seen is not None, "the merge's temporary was never seen"
        size, bobs, alices = seen
        assert size > 0 and bobs.get(f"{run_dir.name}/merged", 0) >= size, (size, bobs)
        assert alices[run_dir.name] <= folder_bytes(run_dir) - size, (size, alices)
    finally:
        hub.close()
        _answer(_signed_in(url, "alice"), run_dir.name, api_name="/delete_run")


@pytest.mark.slow
def test_a_push_waits_for_the_one_model_slot(signed_in_app, tiny_llama_dir: Path) -> None:
    """A push verifies an adapter zip (the base model loaded here and in a fresh process) or merges: it takes the one
    slot that merges, exports, evaluations and Compare share, so a visitor's pushes never load models beside them. It
    ran beside them (up to the default two at once, each a model in memory)."""
    from gradio_client.utils import Status

    from helpers.run_folders import make_adapter_run
    from phi3_lora.access import RunStarters

    url, runs, _ = signed_in_app
    run_dir = make_adapter_run(runs, tiny_llama_dir, "20260104-000000-bob-slot")
    RunStarters(runs).record(run_dir.name, "auth:bob")
    bob, alice = _signed_in(url, "bob"), _signed_in(url, "alice")
    try:
        merge = bob.submit(*endpoint_args(bob, "export_merged", Adapter=run_dir.name), api_name="/export_merged")
        deadline = time.monotonic() + 300
        while merge.status().code not in (Status.PROCESSING, Status.PROGRESS, Status.FINISHED):
            assert time.monotonic() < deadline, "the merge never started"
            time.sleep(0.05)
        push = alice.submit(*endpoint_args(alice, "push_to_hub", Adapter="no-such-run", **{
            "Repo id": "alice/x", "Hugging Face token": "hf_alices_own"}), api_name="/push_to_hub")
        time.sleep(3)
        waiting, merging = not push.done(), not merge.done()
        assert merging, "the merge ended before the push could be seen waiting"
        assert waiting and push.status().code not in (Status.PROCESSING, Status.PROGRESS), push.status()
        merge.result(timeout=600)
        with pytest.raises(Exception, match="not a run or checkpoint"):
            push.result(timeout=120)
    finally:
        _answer(bob, run_dir.name, api_name="/delete_run")


@pytest.mark.slow
def test_a_visitors_run_saves_and_stops_at_the_time_limit(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """The machine trains one run at a time: alice's run of a million steps saves and stops once its time is up
    (Limits.run_seconds, 30 s here), saying why and that Resume goes on, so the job slot is free again. It trained
    until somebody stopped it, keeping every other visitor out meanwhile."""
    from helpers.apps import ENDLESS_STEPS, SAMPLE, start_args
    from phi3_lora import events, jobs
    from phi3_lora.runs import RunDir
    from phi3_lora.ui import AppOptions, build_app, launch

    runs = tmp_path / "runs"
    demo = build_app(options=AppOptions(runs_dir=runs, default_model=str(tiny_llama_dir),
                                        limits=Limits(run_seconds=30)))
    _, url, _ = launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True, auth=USERS)
    run_id = None
    try:
        alice = _signed_in(url, "alice")
        _answer(alice, *start_args(alice, **{"Data source": str(SAMPLE), "Max steps": ENDLESS_STEPS}),
                api_name="/start_training")
        run_id = jobs.active_run(runs)
        assert run_id, "the run did not start"
        run, deadline = RunDir(runs / run_id), time.monotonic() + 400
        while (status := events.run_status(run.path)).state in ("queued", "starting", "running", "stopping"):
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        assert status.state == "stopped" and "time limit for a visitor's run" in status.reason, status
        assert "(30 s); press Resume" in status.reason and run.last_checkpoint() is not None
        assert 0 < status.step < ENDLESS_STEPS
        while jobs.active_run(runs) is not None:  # the slot is free again once the process has exited
            assert time.monotonic() < deadline, "the run's process did not end"
            time.sleep(0.2)
    finally:
        if run_id and jobs.active_run(runs):
            jobs.stop_run(run_id, runs, grace=5)
        demo.close()


# --- anonymous clients: each a share of the anonymous pool ----------------------------------------------------------

def test_one_anonymous_client_takes_a_share_of_the_pool_not_all_of_it(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """Through a share link every visitor is anonymous, and the tunnel appends each one's address to
    X-Forwarded-For. One client uploading again and again (a new session each time) used to fill the whole anonymous
    pool of uploads, refusing every other anonymous visitor; it stops at its quarter, with a message that says so,
    while another client's upload is taken. Writing other addresses into the header does not help: the tunnel's own
    entry, the last one, is what counts; nor do other addresses of the same IPv6 /64."""
    from gradio_client import Client, handle_file

    from phi3_lora.ui import AppOptions, build_app, launch

    limits = Limits(uploads_anonymous=200 * KB, uploads_anonymous_client=50 * KB)
    options = AppOptions(runs_dir=tmp_path / "runs", default_model=str(tiny_llama_dir), shared=True, limits=limits)
    demo = build_app(options=options)
    _, url, _ = launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True)

    clients: list[Any] = []  # kept, so every session stays open: a client let go ends its session and its uploads

    def upload(forwarded_for: str, name: str) -> str:
        """A new session (client) of a visitor behind the tunnel, uploading 40 KiB."""
        c = Client(url, verbose=False, headers={"X-Forwarded-For": forwarded_for})
        clients.append(c)
        return _answer(c, handle_file(str(_upload(tmp_path, name))), api_name="/upload_dataset")

    try:
        assert upload("203.0.113.7", "a1.jsonl").startswith("upload:")
        second = upload("203.0.113.7", "a2.jsonl")
        assert "visitors from your network address have 40 KiB of uploads on this server" in second, second[:600]
        assert "one address may keep 50 KiB" in second and "Sign in" in second and "Traceback" not in second
        forged = [upload(f"198.18.0.{i}, 203.0.113.7", f"f{i}.jsonl") for i in range(3)]
        assert all("visitors from your network address have 40 KiB" in f for f in forged), forged
        assert upload("198.51.100.9", "b1.jsonl").startswith("upload:")  # another client still uploads
        assert upload("2001:db8:0:1::1", "v1.jsonl").startswith("upload:")
        assert "visitors from your network address" in upload("2001:db8:0:1::2", "v2.jsonl")
    finally:
        demo.close()
