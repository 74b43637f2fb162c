"""Visitors' Hub downloads: which visitor caused which, and the check before a new one (the room's limits are
quotas.Limits.downloads(); the owner's downloads are neither checked nor counted).

    <runs>/.downloads.json   "model:owner/name" | "dataset:owner/name" -> {"holder", "bytes", "used_at"}

Every base model, adapter or dataset a visitor's request names is checked here from its Hub file list before a byte
of it downloads: one the Hub cache holds already costs nothing (its entry is marked used); a new one counts for the
visitor (quotas.holder_of) within their share, the anonymous pool and the total, which also counts the rest of the
cache (the owner's models). When it does not fit, visitors' downloads that no request has used for
quotas.DOWNLOAD_EXPIRY_S give way, oldest first (a copy of what the Hub keeps: a later request downloads it again).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

from phi3_lora import quotas
from phi3_lora.errors import UserError
from phi3_lora.runs import write_atomic

LEDGER = ".downloads.json"
# A new entry counts this long even before its repo shows in the cache: its download may still be under way.
UNDER_WAY_S = 3600
_lock = threading.Lock()


def repo_key(repo_id: str, repo_type: str = "model") -> str:
    return f"{repo_type}:{repo_id}"


def cache_root() -> Path:
    import huggingface_hub.constants as hc

    return Path(hc.HF_HUB_CACHE)


def cache_folder(key: str) -> Path:
    """The Hub cache's folder of a repo key (huggingface_hub's layout: models--owner--name)."""
    kind, repo_id = key.split(":", 1)
    return cache_root() / f"{kind}s--{repo_id.replace('/', '--')}"


def is_cached(key: str) -> bool:
    return (cache_folder(key) / "snapshots").is_dir()


def holds_all(key: str, size: int) -> bool:
    """The cache holds the repo's `size` bytes (from its file list) already, not just some of its files: naming a
    Hub model in Settings or the Dataset tab reads its config.json and tokenizer, which makes the repo 'cached'."""
    from phi3_lora.quotas import folder_bytes

    return is_cached(key) and folder_bytes(cache_folder(key)) >= size


def _read(runs_dir: Path) -> dict[str, dict]:
    try:
        data = json.loads((Path(runs_dir) / LEDGER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def _write(runs_dir: Path, data: dict[str, dict]) -> None:
    write_atomic(Path(runs_dir) / LEDGER, json.dumps(data, indent=1))


def held(ledger: dict[str, dict], now: float) -> list[quotas.Held]:
    """The entries that count: their repo is in the cache, or their download began less than UNDER_WAY_S ago."""
    out = []
    for key, entry in ledger.items():
        try:
            used_at, size, holder = float(entry["used_at"]), int(entry["bytes"]), str(entry["holder"])
        except (KeyError, TypeError, ValueError):
            continue
        if is_cached(key) or now - used_at < UNDER_WAY_S:
            out.append(quotas.Held(key, holder, size, used_at))
    return out


def _cache_bytes() -> int:
    from phi3_lora.quotas import folder_bytes

    return folder_bytes(cache_root()) if cache_root().is_dir() else 0


def _disk_free() -> int:
    probe = cache_root()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_room(runs_dir: Path, holder: str | None, key: str, size: int | None,
               limits: quotas.Limits = quotas.LIMITS, now: float | None = None) -> None:
    """Refuse a visitor's new download of `key` (`size` bytes, from its file list) that does not fit the room, after
    older visitors' downloads gave way; else count it for `holder`. `holder` None: the owner, never checked."""
    if holder is None or not size:
        return
    now = time.time() if now is None else now
    what = key.split(":", 1)[1]
    with _lock:
        ledger = _read(runs_dir)
        room, entries = limits.downloads(), held(ledger, now)
        if key in {h.key for h in entries} or holds_all(key, size):
            # downloaded before (or under way): a later use costs no more disk, and keeps it from giving way. A repo
            # of which only the config or tokenizer is here (an estimate read them) still downloads its weights: it
            # counted for nobody when that was enough to pass as downloaded.
            if key in ledger:
                ledger[key]["used_at"] = now
                _write(runs_dir, ledger)
            return
        rest = max(0, _cache_bytes() - sum(h.size for h in entries if is_cached(h.key)))
        everything = [*entries, quotas.Held("(the rest of the Hub cache)", quotas.OWNER, rest, now)]
        free = _disk_free()
        if free - size < limits.disk_reserve:
            raise UserError(f"{what} ({quotas.size_text(size)}) is not downloaded: this server's disk would keep less "
                            f"than {quotas.size_text(limits.disk_reserve)} free ({quotas.size_text(free)} free now).",
                            hint="Pick a model, adapter or dataset that is already in use here (the lists), or run "
                                 "phi3_lora on your own machine.")
        gone = quotas.expiry_plan(room, everything, holder, size, now)
        if gone is None:
            raise quotas.room_refusal(room, quotas.usage(everything), holder, size, f"Downloading {what}",
                                      instead="Pick a model, adapter or dataset that is already in use here (the "
                                              "lists).")
        for entry in gone:  # the oldest unused visitors' downloads: the Hub keeps them
            shutil.rmtree(cache_folder(entry.key), ignore_errors=True)
            ledger.pop(entry.key, None)
        ledger[key] = {"holder": holder, "bytes": int(size), "used_at": now}
        _write(runs_dir, ledger)
