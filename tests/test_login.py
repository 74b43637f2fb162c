"""--auth logins slow down guessers (issue 13 item 8: 200 wrong passwords took 2.8 s), and the password can
come from a file or an environment variable instead of the command line (where `ps` shows it)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from helpers.apps import app_process, served_app
from phi3_lora.ui import login



def test_credentials_from_flag_file_or_environment(tmp_path: Path) -> None:
    file = tmp_path / "users.txt"
    file.write_text("# who may log in\nalice:pa:ss word\n\nbob:x\n")
    assert login.load_credentials("carol:c", str(file), {}) == [("carol", "c")]
    assert login.load_credentials(None, str(file), {"PHI3_LORA_AUTH": "eve:e"}) == [("alice", "pa:ss word"),
                                                                                  ("bob", "x")]
    assert login.load_credentials(None, None, {"PHI3_LORA_AUTH": "eve:e"}) == [("eve", "e")]
    assert login.load_credentials(None, None, {}) == []
    for bad in ("nopassword", "user:", ":pass"):
        (tmp_path / "bad.txt").write_text(bad + "\n")
        with pytest.raises(ValueError, match="line 1"):
            login.load_credentials(None, str(tmp_path / "bad.txt"), {})
    with pytest.raises(ValueError, match="cannot read"):
        login.load_credentials(None, str(tmp_path / "missing.txt"), {})


def test_delay_doubles_after_the_free_failures_up_to_a_cap() -> None:
    assert [login.delay_for(n, free=3, base=1, cap=30) for n in range(10)] == [0, 0, 0, 1, 2, 4, 8, 16, 30, 30]


@pytest.mark.slow
def test_app_py_reads_the_password_from_a_file_and_keeps_it_out_of_ps(tmp_path: Path) -> None:
    """The started app.py's command line (what `ps` shows) holds no password; the login works."""
    import httpx

    file = tmp_path / "users.txt"
    file.write_text("alice:a-long-passphrase\n")
    with app_process(["--runs-dir", str(tmp_path / "runs"), "--auth-file", str(file), "--model", "embedded"],
                     cwd=tmp_path, log_path=tmp_path / "app.log", ready="", timeout=600) as (url, proc):
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert "app.py" in cmdline and "--auth-file" in cmdline and "a-long-passphrase" not in cmdline
        base = url.rstrip("/")
        assert httpx.post(base + "/login", data={"username": "alice", "password": "wrong"},
                          timeout=60).status_code == 400
        assert httpx.post(base + "/login", data={"username": "alice", "password": "a-long-passphrase"},
                          timeout=60).status_code == 200


@pytest.fixture(scope="module")
def auth_app(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path):
    with served_app(tmp_path_factory.mktemp("runs"), tiny_llama_dir, auth=("alice", "s3cret")) as (url, demo):
        yield demo, url.rstrip("/")


def _login(base: str, password: str, user: str = "alice") -> tuple[int, float]:
    import httpx

    t0 = time.monotonic()
    r = httpx.post(base + "/login", data={"username": user, "password": password}, timeout=120)
    return r.status_code, time.monotonic() - t0


@pytest.mark.slow
def test_wrong_passwords_slow_down_and_a_success_clears_the_count(auth_app, monkeypatch) -> None:
    """Each attempt's wait is the one the throttle chose (recorded), and took at least that long. "No wait" is the
    recorded 0, not a wall time under a bound: a loaded machine can take a second to answer any request."""
    _, base = auth_app
    chosen: list[float] = []
    delay_for = login.delay_for

    def recorded(*args, **kwargs) -> float:  # the check looks delay_for up on each attempt
        chosen.append(delay_for(*args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(login, "delay_for", recorded)

    def attempt(password: str) -> tuple[int, float, float]:
        before = len(chosen)
        code, took = _login(base, password)
        return code, took, max(chosen[before:])  # the wait is the longer of the client's and the name's

    attempts = [attempt(f"wrong-{i}") for i in range(6)]
    print(f"\n[login] 6 wrong passwords one after the other: {sum(t for _, t, _ in attempts):.1f} s "
          f"({[round(t, 1) for _, t, _ in attempts]})")
    assert [code for code, _, _ in attempts] == [400] * 6
    assert [wait for _, _, wait in attempts] == [0, 0, 0, 1, 2, 4]
    assert all(took >= wait - 0.1 for _, took, wait in attempts)
    code, took, wait = attempt("s3cret")  # the owner of the account waits too, then gets in
    assert code == 200 and wait == 8 and took >= 7.9
    code, _, wait = attempt("wrong-again")
    assert code == 400 and wait == 0  # the success cleared the count


@pytest.mark.slow
def test_200_guesses_at_once_do_not_get_in(auth_app) -> None:
    """200 guesses sent at once from one client, the right one among them (it would get in within 2.8 s without
    the throttle): at most a handful are checked, the rest are refused unchecked, and none gets in."""
    import httpx

    _, base = auth_app
    codes: list[int] = []
    start = time.monotonic()

    def attempt(i: int) -> None:
        password = "s3cret" if i == 100 else f"guess-{i}"
        try:
            codes.append(httpx.post(base + "/login", data={"username": "alice", "password": password},
                                    timeout=15).status_code)
        except httpx.HTTPError:  # still queued when the client gave up
            codes.append(0)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    print(f"\n[login] 200 guesses at once: {codes.count(400)} refused, {codes.count(0)} still waiting at 15 s, "
          f"{codes.count(200)} got in, in {elapsed:.1f} s")
    assert 200 not in codes
