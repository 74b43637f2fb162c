"""What one visitor may keep on this machine's disk: the one owner of the limits of every room visitors share.

Each room has a total for every visitor together, a fair share per visitor identity well below it, and one pool
for all anonymous visitors together, also below the total, so signed-in visitors keep room whatever anonymous
ones do; within the pool each anonymous client (network) gets a quarter, so one client cannot take it all. The owner
is never counted nor capped here: the owner decides for themself.

    room       what it holds (who counts it)                      total    per identity  anonymous pool (per client)
    uploads    session uploads (uploads.store)                    4 GiB    1 GiB         2 GiB (512 MiB)
    drafts     draft copies of uploads (uploads.keep_for_draft)   2 GiB    512 MiB       1 GiB (256 MiB)
    downloads  Hub models, adapters and datasets a visitor's
               request downloads (downloads.check_room)           64 GiB   16 GiB        32 GiB (8 GiB)
    runs       a signed-in visitor's runs, merges and the copies
               of uploads kept for their runs (ui.guard)          -        50 GiB        - (cannot train)
    received   files sent to gradio's upload route, which keeps
               them in its cache for up to UPLOAD_CACHE_S
               (ui.bodies)                                        4 GiB    1 GiB         2 GiB (512 MiB)

Every other request's body (an event's inputs) is at most REQUEST_BYTES: the server holds a body in memory whole.
Unqueued events, which no queue bounds, are paced per sender: CALLS_PER_S, waiting at most CALLS_WAIT_S (ui.bodies).

A visitor's run also has a time: it saves and stops after RUN_SECONDS (4 h) of each start or resume.

Identity: a signed-in visitor is their sign-in ('auth:alice', 'hf:bob'). An anonymous visitor is 'anonymous:<key>',
the key of the network their requests come from (ui.guard.client_key, access.client_network: the address the proxies
in front of the app saw, which a forged header cannot change; an IPv6 /64): a gradio session hash is new with every
reload (and a draft's token is whatever the browser sends), so a share per session or per browser would stop nobody.
A client with many addresses gets a quarter on each: the pool still bounds them all, below the total. The key is
hashed with a secret of the app's process, so no address is written to disk; after a restart a client's earlier
entries still count in the pool, not in its new share. Entries from before clients were told apart count as one
client, ANONYMOUS.

Rooms recover on their own: a room of copies (drafts, downloads) that a new one does not fit gives up its entries
older than a bound, oldest first (`expiry_plan`); a draft is a temporary copy of an upload and a download a copy of
what the Hub keeps, so nobody's work is lost, and runs are never touched. Session uploads go when their session ends
(uploads.MAX_AGE_S at most); a visitor's runs only when they delete them. The arithmetic here is pure; the disk is
read by the modules that own each room (uploads, downloads) and by `run_bytes_of`.

The defaults are the named constants below; the app's owner changes them with AppOptions(limits=Limits(...)).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from phi3_lora.access import Level, Requester
from phi3_lora.errors import UserError

ANONYMOUS = "anonymous"   # every anonymous visitor together
OWNER = "owner"           # what the owner's entries are marked with: never counted

# Drafts: one upload is at most uploads.SESSION_QUOTA_BYTES (512 MiB), so a share holds one full-size draft; the
# anonymous pool holds two and leaves half the total to signed-in visitors.
DRAFTS_TOTAL_BYTES = 2 * 2**30
DRAFTS_SHARE_BYTES = 512 * 2**20
DRAFTS_ANONYMOUS_BYTES = 1 * 2**30
DRAFTS_ANONYMOUS_CLIENT_BYTES = DRAFTS_ANONYMOUS_BYTES // 4
# A draft copy older than this gives way to a newer one that would not fit (a visitor's own older copies give way
# to their newer one at any age). A day: a visitor who comes back the next morning usually finds theirs, and a
# client that filled the anonymous pool blocks other anonymous drafts for a day at most.
DRAFT_EXPIRY_S = 24 * 3600

# Session uploads (their total, 4 GiB, and a session's 512 MiB are uploads.py's, AppOptions.upload_*_quota): a
# signed-in visitor's sessions together hold two full sessions, every anonymous one's together half the total.
UPLOADS_SHARE_BYTES = 1 * 2**30
UPLOADS_ANONYMOUS_BYTES = 2 * 2**30
UPLOADS_ANONYMOUS_CLIENT_BYTES = UPLOADS_ANONYMOUS_BYTES // 4  # one full session (uploads.SESSION_QUOTA_BYTES)

# Downloads: a 7-8B model in 16-bit is ~15 GiB, so a share holds one such base (or several small ones); the
# anonymous pool leaves half of the total to signed-in visitors. The disk keeps its reserve whatever the room says.
DOWNLOADS_TOTAL_BYTES = 64 * 2**30
DOWNLOADS_SHARE_BYTES = 16 * 2**30
DOWNLOADS_ANONYMOUS_BYTES = 32 * 2**30
DOWNLOADS_ANONYMOUS_CLIENT_BYTES = DOWNLOADS_ANONYMOUS_BYTES // 4  # Phi-3-mini's 7.6 GiB fits
DISK_RESERVE_BYTES = 10 * 2**30
# A visitor's download that no request has used for this long gives way to a new one that would not fit the total.
DOWNLOAD_EXPIRY_S = 7 * 24 * 3600

# Runs: a Phi-3-mini run keeps a few checkpoints of ~0.4 GiB and a merge of 7.6 GiB; 50 GiB holds a handful of
# merged runs, a quarter of a 200 GiB Space disk.
RUNS_SHARE_BYTES = 50 * 2**30
# A visitor's run (a start or a resume: training and the scoring of its answers) saves and stops after this long: the
# machine trains one run at a time, and a run of a million steps would keep every other visitor out for good. A
# Phi-3-mini QLoRA run on a few thousand rows takes well under an hour on a Space's GPU; Resume goes on.
RUN_SECONDS = 4 * 3600

# Requests. gradio reads an event's inputs into memory whole and keeps them while the event waits in the queue (a
# 300 MB body raised the app's memory by 0.9 GB): an event's inputs are a form's values, a Compare conversation of
# 64 KiB a side at most (AppOptions.max_chat_bytes), so 4 MiB is far above any the page sends.
REQUEST_BYTES = 4 * 2**20
# Files go through gradio's upload route (one request may carry a thousand files of AppOptions.max_file_size each),
# into gradio's cache, where they stay until its sweep (ui.app's delete_cache: every 30 min, older than an hour): what
# a visitor sent within that time counts in the 'received' room, which has the numbers of session uploads.
UPLOAD_CACHE_S = 5400
# gradio's queue (AppOptions.queue_max_size events of everybody) per sender, waiting or running at once: half of it, so
# no one sender fills it. Not less: a page restoring a draft sends half a dozen at once (estimates, layers, curves),
# more on a busy machine where each waits longer, and visitors behind one network address share a sender's half.
EVENTS_SHARE = 0.5
# Unqueued events (the Train tab's poll, the draft's save) are plain HTTP posts to gradio_api/run/<name>, answered at
# once: no queue bounds them, and one poll of a finished run took 140 ms of a loaded 2-core machine, so one client
# calling it in a loop kept a core busy. Each sender (holder_of) may make CALLS_PER_S of them a second, CALLS_BURST at
# once; a call past that waits its turn, up to CALLS_WAIT_S, and is refused (429) beyond it. A page has at most a poll
# (one a second, AppOptions.poll_seconds) and a draft save (one at a time, trigger_mode='always_last', however fast a
# slider is dragged) on their way, so it waits at most a fraction of a second, never refused, with a few tabs open
# too; a client calling in a loop is held to CALLS_PER_S. Visitors behind one network address share a sender's rate.
CALLS_PER_S = 4.0
CALLS_BURST = 8
CALLS_WAIT_S = 3.0


@dataclass(frozen=True)
class Limits:
    """Every limit of this module in one value (AppOptions.limits); the defaults are the constants above."""

    drafts_total: int = DRAFTS_TOTAL_BYTES
    drafts_share: int = DRAFTS_SHARE_BYTES
    drafts_anonymous: int = DRAFTS_ANONYMOUS_BYTES
    drafts_anonymous_client: int = DRAFTS_ANONYMOUS_CLIENT_BYTES
    draft_expiry_s: float = DRAFT_EXPIRY_S
    uploads_share: int = UPLOADS_SHARE_BYTES
    uploads_anonymous: int = UPLOADS_ANONYMOUS_BYTES
    uploads_anonymous_client: int = UPLOADS_ANONYMOUS_CLIENT_BYTES
    downloads_total: int = DOWNLOADS_TOTAL_BYTES
    downloads_share: int = DOWNLOADS_SHARE_BYTES
    downloads_anonymous: int = DOWNLOADS_ANONYMOUS_BYTES
    downloads_anonymous_client: int = DOWNLOADS_ANONYMOUS_CLIENT_BYTES
    disk_reserve: int = DISK_RESERVE_BYTES
    download_expiry_s: float = DOWNLOAD_EXPIRY_S
    runs_share: int = RUNS_SHARE_BYTES
    run_seconds: float = RUN_SECONDS
    request_bytes: int = REQUEST_BYTES
    upload_cache_s: float = UPLOAD_CACHE_S
    # files sent to gradio's upload route ('received'): the numbers of session uploads, set apart from them
    received_total: int = 4 * 2**30
    received_share: int = UPLOADS_SHARE_BYTES
    received_anonymous: int = UPLOADS_ANONYMOUS_BYTES
    received_anonymous_client: int = UPLOADS_ANONYMOUS_CLIENT_BYTES
    events_share: float = EVENTS_SHARE
    calls_per_s: float = CALLS_PER_S
    calls_burst: int = CALLS_BURST
    calls_wait_s: float = CALLS_WAIT_S

    def drafts(self) -> Room:
        return Room("drafts", self.drafts_total, self.drafts_share, self.drafts_anonymous, self.draft_expiry_s,
                    own_give_way=True, anonymous_client=self.drafts_anonymous_client)

    def uploads(self, total: int) -> Room:
        """Sessions' uploads: their total is AppOptions.upload_total_quota; they go when their session ends."""
        return Room("uploads", total, self.uploads_share, self.uploads_anonymous, float("inf"),
                    anonymous_client=self.uploads_anonymous_client)

    def received(self) -> Room:
        """Files in gradio's upload cache; an entry goes when the cache's sweep removes its file (upload_cache_s)."""
        return Room("files sent", self.received_total, self.received_share, self.received_anonymous, float("inf"),
                    anonymous_client=self.received_anonymous_client)

    def downloads(self) -> Room:
        return Room("downloads", self.downloads_total, self.downloads_share, self.downloads_anonymous,
                    self.download_expiry_s, anonymous_client=self.downloads_anonymous_client)


LIMITS = Limits()


@dataclass(frozen=True)
class Room:
    """A room that visitors share: a total, a share per identity, a pool for the anonymous ones and a share of the
    pool per anonymous client."""

    name: str
    total: int
    share: int
    anonymous: int
    expiry_s: float
    # A signed-in holder's own entries give way to their newer one at any age (drafts: a browser's newest draft is
    # the one wanted); else only entries older than expiry_s go (downloads: an older one may be in use).
    own_give_way: bool = False
    anonymous_client: int | None = None  # one anonymous client's share of the pool (None: the whole pool)

    def cap_of(self, holder: str) -> int:
        """The holder's own limit: their share, or one anonymous client's share of the pool."""
        if is_anonymous(holder):
            return self.anonymous if self.anonymous_client is None else min(self.anonymous, self.anonymous_client)
        return self.share


@dataclass(frozen=True)
class Held:
    """One entry of a room: a draft copy or a download. `key`: its name in the room; `holder`: the identity it
    counts for; `used_at`: when it was last written or used (epoch seconds)."""

    key: str
    holder: str
    size: int
    used_at: float


def holder_of(who: Requester) -> str | None:
    """The identity a request's use of the disk counts for: None for the owner (never counted), the sign-in for a
    signed-in visitor, 'anonymous:<client key>' for an anonymous one (ANONYMOUS when the client is not known)."""
    if who.level is Level.OWNER:
        return None
    if who.level is Level.SIGNED_IN and who.identity:
        return who.identity
    return f"{ANONYMOUS}:{who.client}" if who.client else ANONYMOUS


def is_anonymous(holder: str) -> bool:
    """The holder is an anonymous client (counted in the anonymous pool)."""
    return holder == ANONYMOUS or holder.startswith(f"{ANONYMOUS}:")


def pool_used(used: Mapping[str, int]) -> int:
    return sum(n for holder, n in used.items() if is_anonymous(holder))


def usage(held: Iterable[Held]) -> dict[str, int]:
    """Bytes per holder."""
    out: dict[str, int] = {}
    for h in held:
        out[h.holder] = out.get(h.holder, 0) + h.size
    return out


def over(room: Room, used: Mapping[str, int], holder: str, size: int) -> str | None:
    """Which limit `size` more bytes for `holder` would pass: 'share' (the holder's share, or an anonymous client's
    share of the pool), 'pool' (the anonymous pool), 'total', or None when they fit."""
    if used.get(holder, 0) + size > room.cap_of(holder) and not (is_anonymous(holder) and
                                                                room.cap_of(holder) >= room.anonymous):
        return "share"
    if is_anonymous(holder) and pool_used(used) + size > room.anonymous:
        return "pool"
    if sum(used.values()) + size > room.total:
        return "total"
    return None


def expiry_plan(room: Room, held: list[Held], holder: str, size: int, now: float) -> list[Held] | None:
    """The entries to remove, oldest first, so that `size` more bytes for `holder` fit `room`; None when they cannot.
    An entry may go once it is older than room.expiry_s; with room.own_give_way a signed-in holder's own entries give
    way to their newer one at any age (the anonymous pool is many visitors: there the age applies). The fewest: each
    step removes the oldest entry that frees room under the limit that is passed."""
    left, gone = list(held), []
    while (limit := over(room, usage(left), holder, size)) is not None:
        def may_go(h: Held) -> bool:
            if (limit == "share" and h.holder != holder) or (limit == "pool" and not is_anonymous(h.holder)):
                return False
            mine = room.own_give_way and h.holder == holder and not is_anonymous(holder)
            return mine or now - h.used_at > room.expiry_s
        candidates = sorted((h for h in left if may_go(h) and h.size > 0), key=lambda h: h.used_at)
        if not candidates:
            return None
        left.remove(candidates[0])
        gone.append(candidates[0])
    return gone


def size_text(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB"


def room_refusal(room: Room, used: Mapping[str, int], holder: str, size: int, what: str,
                 instead: str = "") -> UserError:
    """The message for `what` (`size` bytes) that does not fit `room` even after expiry: which limit, how full, and
    what to do (`instead`: what else the visitor can do here, said first)."""
    mine, limit = used.get(holder, 0), over(room, used, holder, size)
    if limit == "share" and is_anonymous(holder):
        message = (f"{what} ({size_text(size)}) does not fit: visitors from your network address have "
                   f"{size_text(mine)} of {room.name} on this server, and one address may keep "
                   f"{size_text(room.cap_of(holder))} (anonymous visitors {size_text(room.anonymous)} in all).")
    elif limit == "share":
        message = (f"{what} ({size_text(size)}) does not fit: you have {size_text(mine)} of {room.name} on this "
                   f"server, and the limit is {size_text(room.cap_of(holder))}.")
    elif limit == "pool":
        message = (f"{what} ({size_text(size)}) does not fit: all anonymous visitors together have "
                   f"{size_text(pool_used(used))} of {room.name} on this server, and the limit is "
                   f"{size_text(room.anonymous)}.")
    else:
        message = (f"{what} ({size_text(size)}) does not fit: this server's room for {room.name} is full "
                   f"({size_text(sum(used.values()))} of {size_text(room.total)}).")
    aging = " (the oldest give way with time)" if room.expiry_s != float("inf") else ""
    later = f"try again later{aging}, or run phi3_lora on your own machine."
    hint = f"Sign in to get a share of your own, {later}" if is_anonymous(holder) else later[0].upper() + later[1:]
    return UserError(message, hint=f"{instead} {hint}".strip())


# --- runs: a signed-in visitor's run folders ------------------------------------------------------------------

def runs_refusal(sizes: Mapping[str, int], share: int, what: str, adding: int = 0) -> UserError | None:
    """None while a visitor's runs (`sizes`: run id, or '<run id>/<folder>' for an export they made in a run, -> its
    bytes) and `adding` more bytes stay within `share`; else the message that refuses `what` and names what to delete,
    largest first."""
    used = sum(sizes.values())
    if used + adding <= share:
        return None
    largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
    names = ", ".join(f"{name} ({size_text(n)})" for name, n in largest)
    need = f" and this needs about {size_text(adding)} more" if adding else ""
    return UserError(f"Your runs and exports take {size_text(used)} of this server's disk{need}; each signed-in "
                     f"visitor may keep {size_text(share)}, so {what} is refused.",
                     hint=f"Delete runs or merged copies you no longer need (Train tab, Delete run; an upload kept "
                          f"for runs goes with the last of them); your largest are {names}.")


def folder_bytes(folder: Path) -> int:
    """The bytes of the plain files under `folder` (links not followed): what a room's holder keeps there."""
    total = 0
    for path in Path(folder).rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
        except OSError:  # deleted while we counted
            pass
    return total


def run_bytes_of(runs_dir: Path, holder: str, starters: Mapping[str, str]) -> dict[str, int]:
    """What `holder` keeps in `runs_dir`: each run they started (`starters`: access.RunStarters.all()) by the bytes
    of its folder, less the export folders somebody else made in it, and each export folder they made in any run
    ('<run id>/<folder>'), with its temporary beside it while an export writes it (runs.temporary_of: a merge's
    16-bit copy before it is renamed into place)."""
    from phi3_lora.runs import run_dirs, temporaries_of

    out: dict[str, int] = {}
    for run in run_dirs(runs_dir):
        others = 0
        for name in [k.split("/", 1)[1] for k in starters if k.startswith(f"{run.run_id}/")]:
            folder = run.path / name
            size = (folder_bytes(folder) if folder.is_dir() else 0) + sum(
                folder_bytes(t) for t in temporaries_of(folder) if t.is_dir() and not t.is_symlink())
            if starters.get(f"{run.run_id}/{name}") == holder:
                out[f"{run.run_id}/{name}"] = size
            else:
                others += size
        if starters.get(run.run_id) == holder:
            out[run.run_id] = folder_bytes(run.path) - others - sum(
                v for k, v in out.items() if k.startswith(f"{run.run_id}/"))
    return out
