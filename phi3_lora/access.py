"""Who may do what: the one access policy of the web app (no gradio here; phi3_lora.ui asks it).

Three levels of requester:

- owner: the CLI and the library, or the app bound to loopback with no share link, no --auth, not on a Space
  and not in demo mode (only the person at the machine can reach it);
- signed-in visitor: a user of --auth, or a Hugging Face user signed in on a Space with OAuth;
- anonymous visitor: anyone else (demo mode, a share link or a LAN address without --auth, a signed-out
  visitor of a Space).

`POLICY` says, for every action, what each level may do; `ENDPOINTS` says which actions every named endpoint
of the app can perform. Both are plain data, so one test enumerates them against the running app and the
README's "Sharing safely" table is generated from them. Everything here is a pure function except the small
ledger of who started which run (`RunStarters`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import threading
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from phi3_lora.runs import write_atomic

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class Level(str, Enum):
    OWNER = "owner"
    SIGNED_IN = "signed-in visitor"
    ANONYMOUS = "anonymous visitor"


class Rule(str, Enum):
    YES = "yes"
    OWN = "own runs"   # only runs this requester started (the owner: every run)
    NO = "no"


class Action(str, Enum):
    """What a request can do. `VIEW` covers everything that only reads the app's own pages and runs."""

    VIEW = "look: pages, run lists, progress, estimates, configs"
    UPLOAD = "upload a data file (quota per session, deleted when the session ends)"
    READ_SAMPLE = "validate the bundled sample data"
    READ_UPLOAD = "validate this session's upload"
    READ_HUB_DATA = "validate a Hub dataset id"
    READ_SERVER_PATH = "read a file or folder of the server by its path (data or base model)"
    USE_HUB_MODEL = "use a Hub base model (settings, estimate)"
    START = "start training"
    RESUME = "resume a stopped run"
    STOP = "stop a run"
    DELETE = "delete a run"
    COMPARE = "compare base and tuned answers with a run's adapter"
    COMPARE_HUB = "compare with an adapter published on the Hub"
    EVALUATE = "score a run's adapter on its held-out rows (minutes of generation; writes runs/<id>/eval/)"
    EXPORT_ZIP = "download an adapter zip"
    MERGE = "merge an adapter into its base (16-bit copy on the server)"
    PUSH = "push an adapter or merged model to the Hub (with the requester's own token)"
    SERVER_TOKEN = "use the server's Hugging Face token (HF_TOKEN, saved login)"
    LOAD_RUN_SETTINGS = "load a past run's settings and data source into the form"
    READ_RUN_LOG = "read a run's log and tracker commands (they name the server's folders, model and data files)"
    READ_RUN_DATA = "read the text of a run's data rows (held-out prompts, references and the answers to them)"


Y, OWN, N = Rule.YES, Rule.OWN, Rule.NO
A = Action
# action: (owner, signed-in visitor, anonymous visitor)
POLICY: dict[Action, tuple[Rule, Rule, Rule]] = {
    A.VIEW: (Y, Y, Y),
    A.UPLOAD: (Y, Y, Y),
    A.READ_SAMPLE: (Y, Y, Y),
    A.READ_UPLOAD: (Y, Y, Y),
    A.READ_HUB_DATA: (Y, Y, N),       # an unbounded download on the server: not for anyone at all
    A.READ_SERVER_PATH: (Y, N, N),
    A.USE_HUB_MODEL: (Y, Y, Y),
    A.START: (Y, Y, N),
    A.RESUME: (Y, OWN, N),
    A.STOP: (Y, OWN, N),
    A.DELETE: (Y, OWN, N),
    A.COMPARE: (Y, Y, Y),
    A.COMPARE_HUB: (Y, Y, Y),
    A.EVALUATE: (Y, Y, N),            # bounded in time, but minutes of compute and a file in the run folder
    A.EXPORT_ZIP: (Y, Y, Y),
    A.MERGE: (Y, Y, N),
    A.PUSH: (Y, Y, N),
    A.SERVER_TOKEN: (Y, N, N),
    A.LOAD_RUN_SETTINGS: (Y, OWN, N),  # a run's config holds its owner's paths (data, model folder)
    A.READ_RUN_LOG: (Y, OWN, N),       # the same paths, in the command line and the messages of the run
    A.READ_RUN_DATA: (Y, OWN, N),      # whoever trained on the rows owns them; others see scores and the answers to
                                       # prompts they typed themselves
}
# Switched off for every visitor in demo mode (a demo serves one machine to the whole internet).
DEMO_OFF: frozenset[Action] = frozenset({A.START, A.RESUME, A.MERGE})
LEVELS: tuple[Level, ...] = (Level.OWNER, Level.SIGNED_IN, Level.ANONYMOUS)

# Every named endpoint of the app -> the actions it can perform (VIEW: only reads). READ_RUN_LOG is not listed: the
# Train tab's views leave the log out for whoever may not read it rather than refuse the request; READ_RUN_DATA is
# listed where a request is refused for it (the held-out example), while the scoring panel and the exports' verification
# leave the rows' text out for whoever may not read it. A test lists the running
# app's endpoints and fails on any endpoint missing here, so a new one cannot skip the gate. (The page's unload
# handler, which deletes the session's own uploads, is private: no client can call it.)
_MODEL = (A.USE_HUB_MODEL, A.READ_SERVER_PATH)
_DATA = (A.READ_SAMPLE, A.READ_UPLOAD, A.READ_HUB_DATA, A.READ_SERVER_PATH, *_MODEL)
ENDPOINTS: dict[str, tuple[Action, ...]] = {
    # Settings: the model name may be a Hub id or a server folder
    "model_layers": (A.VIEW, *_MODEL),
    "estimate": (A.VIEW, *_MODEL),
    "apply_preset": (A.VIEW, *_MODEL),
    "show_config": (A.VIEW, *_MODEL),
    "save_draft": (A.UPLOAD,),                # keeps the form in this browser (and a copy of its own upload)
    "restore_draft": (A.UPLOAD,),             # fills the form from this browser's draft
    "load_settings_runs": (A.VIEW,),
    "load_run_settings": (A.LOAD_RUN_SETTINGS,),
    "load_yaml_settings": (A.VIEW, *_MODEL),  # a YAML the visitor uploads; its base model's layers fill the form
    "time_estimate": (A.VIEW, *_DATA),        # reads the step times measured here; gates model and data source
    "measure_step_time": (A.START, *_DATA),   # runs a few training steps on the server: as costly as a start
    # Dataset
    "upload_dataset": (A.UPLOAD,),
    "validate_after_upload": _DATA,
    "use_sample": (A.VIEW,),
    "validate_sample": _DATA,
    "validate": _DATA,
    "validate_source": _DATA,
    "render_example": (A.VIEW, *_MODEL),
    "eval_split": (A.VIEW,),
    "clear_upload": (A.VIEW,),                # only empties this page's source box
    # Train
    "start_training": (A.START, *_DATA),
    "stop_training": (A.STOP,),
    "resume_training": (A.RESUME,),
    "delete_run": (A.DELETE,),               # frees a visitor's share of the disk (quotas.RUNS_SHARE_BYTES)
    "list_runs": (A.VIEW,),
    "select_run": (A.VIEW,),
    "poll_run": (A.VIEW,),
    "overlay_choices": (A.VIEW,),
    "overlay_runs": (A.VIEW,),                # loss curves: what poll_run shows, several runs at once
    # Compare
    "compare": (A.COMPARE, A.COMPARE_HUB, *_MODEL),
    "heldout_example": (A.READ_RUN_DATA,),
    "clear_chats": (A.VIEW,),
    "list_adapters": (A.VIEW,),
    "evaluate": (A.EVALUATE,),
    "eval_results": (A.VIEW,),
    # Export
    "export_zip": (A.EXPORT_ZIP,),
    "export_merged": (A.MERGE,),
    "export_gguf": (A.MERGE,),  # merges, writes a GGUF on the server and loads it again to verify
    "push_to_hub": (A.PUSH, A.MERGE),
    "list_export_adapters": (A.VIEW,),
    # Page
    "open_compare": (A.VIEW,),
    "open_export": (A.VIEW,),
    "load_page": (A.VIEW,),
    # gradio's own, present with the Sign in with Hugging Face button only
    "_check_login_status": (A.VIEW,),
}
OPTIONAL_ENDPOINTS = frozenset({"_check_login_status"})


def rule(action: Action, level: Level, *, demo: bool = False) -> Rule:
    """What `level` may do about `action` (demo mode switches DEMO_OFF actions off for visitors)."""
    if demo and level is not Level.OWNER and action in DEMO_OFF:
        return Rule.NO
    return POLICY[action][LEVELS.index(level)]


def gated(action: Action) -> bool:
    """Some level (or demo mode) is refused this action."""
    return action in DEMO_OFF or any(r is not Rule.YES for r in POLICY[action])


# --- who is asking ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerMode:
    """How the app was started: decides the level of a request that carries no sign-in."""

    host: str = "127.0.0.1"
    shared: bool = False       # a share link was asked for (even if the tunnel failed)
    auth: bool = False         # --auth: every request carries a user name
    on_space: bool = False
    oauth: bool = False        # Space with hf_oauth: visitors may sign in with Hugging Face
    demo: bool = False
    launched: bool = True      # False until launch() saw host/share/auth: then nobody is owner

    @property
    def owner_at_the_machine(self) -> bool:
        return (self.launched and self.host in LOOPBACK_HOSTS and not self.shared and not self.auth
                and not self.on_space and not self.demo)


UNLAUNCHED = ServerMode(launched=False)


@dataclass(frozen=True)
class Requester:
    """The level and identity of one web request (identity: 'auth:alice', 'hf:bob', or None)."""

    level: Level
    identity: str | None = None
    oauth_token: str | None = None   # the visitor's own Hub token from Sign in with Hugging Face
    session: str | None = None       # a key of this browser session (its upload folder), if any
    client: str | None = None        # a key of the network the request came from (client_network), if known

    def __repr__(self) -> str:  # never print a token
        return f"Requester({self.level.value}, {self.identity})"


def requester(mode: ServerMode, username: str | None = None, oauth_user: str | None = None,
              oauth_token: str | None = None) -> Requester:
    """The level of a request: a --auth user or a Space OAuth user is a signed-in visitor; otherwise the owner
    when the app can only be reached from this machine, else an anonymous visitor."""
    if mode.auth and username:
        return Requester(Level.SIGNED_IN, f"auth:{username}")
    if mode.oauth and oauth_user:
        return Requester(Level.SIGNED_IN, f"hf:{oauth_user}", oauth_token or None)
    if mode.owner_at_the_machine:
        return Requester(Level.OWNER, "owner")
    return Requester(Level.ANONYMOUS)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An X-Forwarded-For entry or a peer as an address: '1.2.3.4', '1.2.3.4:5', '::1', '[::1]:5'; None otherwise."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def client_network(peer: str | None, forwarded_for: list[str], *, on_space: bool = False) -> str:
    """Where a request came from, as far as this server can tell without believing the client: the connection's
    address; when that is a proxy in front of this app (loopback: a share link's tunnel, a local reverse proxy; on a
    Space also a private address: the Space's proxies), the address that proxy appended to X-Forwarded-For, and so
    on leftwards while it is such a proxy. A client may put anything in the header, but only to the left of what the
    proxies append, which this never reads (uvicorn reads it the same way for a loopback peer). An IPv6 address
    counts as its /64: one subscriber's network, whose hosts may take any of its 2^64 addresses. Pure."""
    hops = [e for header in forwarded_for for e in header.split(",") if e.strip()] + [peer or "unknown"]
    for i in range(len(hops) - 1, -1, -1):
        address = _address(hops[i])
        proxy = address is not None and (address.is_loopback or (on_space and address.is_private))
        if not proxy or i == 0:
            break
    if address is None:
        return hops[i].strip()[:64] or "unknown"
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


# --- decisions ------------------------------------------------------------------------------------------

def _how_to_get_it(level: Level, mode: ServerMode) -> str:
    if level is Level.SIGNED_IN or mode.demo:
        return "Run phi3_lora on your own machine (or duplicate the Space) to do this."
    if mode.oauth:
        return "Sign in with Hugging Face first (the button at the top of the page)."
    if mode.shared or mode.host not in LOOPBACK_HOSTS:
        return ("Ask the person who shared this app to start it with --auth and give you a login, or run "
                "phi3_lora on your own machine.")
    return "Run phi3_lora on your own machine to do this."


def refusal(action: Action, who: Requester, mode: ServerMode, *, started_by: str | None = None) -> str | None:
    """None when `who` may do `action`, else the message that says why not and what to do instead.
    `started_by`: for OWN rules, the identity that started the run concerned."""
    r = rule(action, who.level, demo=mode.demo)
    if r is Rule.YES or (r is Rule.OWN and who.identity is not None and started_by == who.identity):
        return None
    what = action.value.split(" (")[0]
    if r is Rule.OWN:
        return f"Not allowed: {who.level.value}s may {what} only for runs they started themselves."
    if mode.demo and action in DEMO_OFF:
        return f"Not allowed in this demo: {what}. {_how_to_get_it(who.level, mode)}"
    article = "an" if who.level is Level.ANONYMOUS else "a"
    return f"Not allowed for {article} {who.level.value} here: {what}. {_how_to_get_it(who.level, mode)}"


def hub_token(who: Requester, typed: str | None) -> str | bool | None:
    """The token a Hub call of this request may use: one typed in the form, else the visitor's own sign-in
    token; the owner falls back to the server's login (None: huggingface_hub's default). Visitors without a
    token of their own get False: huggingface_hub then sends no token at all."""
    typed = (typed or "").strip()
    if typed:
        return typed
    if who.oauth_token:
        return who.oauth_token
    return None if rule(A.SERVER_TOKEN, who.level) is Rule.YES else False


# --- where data and models come from ---------------------------------------------------------------------

def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # a symlink loop is nobody's upload
        return False


def source_action(source: str, *, sample: Path, uploads: Path | None, is_hub_id: bool) -> Action:
    """What reading this data source is: the bundled sample, this session's upload, a Hub dataset id or a
    server path. `uploads`: this session's upload folder; `is_hub_id`: readers.is_hub_id(source) (what the
    reader will do with it). Symlinks are resolved first, so a link out of the uploads is a server path."""
    source = (source or "").strip()
    if is_hub_id:
        return A.READ_HUB_DATA
    path = Path(source)
    if path.is_absolute() and not path.is_symlink():
        if path.resolve() == sample.resolve():
            return A.READ_SAMPLE
        if uploads is not None and _inside(path, uploads) and path.parent.resolve() == uploads.resolve():
            return A.READ_UPLOAD
    return A.READ_SERVER_PATH


def model_action(name: str, *, known: set[str], is_path: bool) -> Action:
    """A base model name from the web: a catalogue or app-default name and Hub ids are fine for anybody; a
    folder of the server (anything that exists as a path, or looks like one) is the owner's."""
    name = (name or "").strip()
    if name in known or name.lower() == "auto":
        return A.USE_HUB_MODEL
    if is_path or name.startswith((".", "/", "~", "\\")) or name.count("/") > 1:
        return A.READ_SERVER_PATH
    return A.USE_HUB_MODEL


def template_action(value: str | None, *, is_text: bool) -> Action:
    """model.chat_template from the web: template text is rendered in transformers' Jinja sandbox, fine for
    anybody; anything else is the path of a file the training process would read, the owner's. `is_text`:
    models.template_is_text(value) (what the reader will do with it)."""
    return A.VIEW if is_text or not (value or "").strip() else A.READ_SERVER_PATH


# --- rows anybody may read -----------------------------------------------------------------------------

def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def row_texts(row: Any) -> list[Any] | None:
    """The message texts of a data row ({"messages": [...]} or the list itself); None when it is not one."""
    messages = row.get("messages") if isinstance(row, dict) else row
    if not isinstance(messages, list) or not messages:
        return None
    texts = [m.get("content") if isinstance(m, dict) else None for m in messages]
    return texts if all(isinstance(t, str) for t in texts) else None


def public_rows(rows: list[Any], public: frozenset[str]) -> bool:
    """READ_RUN_DATA is for the rows' owner, but text that the bundled sample holds is public (anybody may read the
    sample: READ_SAMPLE): True when there are rows and every message text of every row is, by content (sha256), a
    text of the sample (`public`: the digests of its texts). Decided by the text shown, never by a name: a run's
    recorded data source or a file name says nothing about what a row holds."""
    if not rows or not public:
        return False
    for row in rows:
        texts = row_texts(row)
        if texts is None or any(text_digest(t) not in public for t in texts):
            return False
    return True


# --- who started which run ------------------------------------------------------------------------------

class RunStarters:
    """runs/.starters.json: run id -> the identity that started it from the web (owner level: 'owner'), so a
    signed-in visitor can stop and resume their own runs and nobody else's; '<run id>/<folder>' -> the identity that
    made that export folder (a merge) inside the run, whose disk it counts on (quotas.run_bytes_of). Written
    atomically."""

    FILE = ".starters.json"

    def __init__(self, runs_dir: Path) -> None:
        self.path = Path(runs_dir) / self.FILE
        self._lock = threading.Lock()

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def get(self, run_id: str) -> str | None:
        return self._read().get(run_id)

    def all(self) -> dict[str, str]:
        """Every entry: run ids, and '<run id>/<folder>' for an export folder made inside a run from the web."""
        return self._read()

    def record(self, run_id: str, identity: str | None) -> None:
        if identity is None:
            return
        with self._lock:
            data = self._read()
            data[run_id] = identity
            write_atomic(self.path, json.dumps(data, indent=1))  # a CLI process may write it beside the app


# --- the README table -----------------------------------------------------------------------------------

def policy_table() -> str:
    """The README's "Sharing safely" table, generated from POLICY (a test checks the README holds it)."""
    head = "| action | owner | signed-in visitor | anonymous visitor |\n| --- | --- | --- | --- |"
    rows = []
    for action, rules in POLICY.items():
        cells = [r.value + (" (not in demo)" if action in DEMO_OFF and lvl is not Level.OWNER and r is not Rule.NO
                            else "") for lvl, r in zip(LEVELS, rules)]
        rows.append(f"| {action.value} | " + " | ".join(cells) + " |")
    return "\n".join([head, *rows])
