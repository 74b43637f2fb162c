"""Answer with the base and the tuned model from ONE copy of the weights.

The adapter sits on the loaded base model; peft's mixed-adapter batches let one `generate`
call produce the base answer (row 0, adapter "__base__" = off) and the tuned answer (row 1)
together, with the same sampling settings and seed, streaming both token by token. When a
batch cannot mix adapters (DoRA), the two answers run one after the other, the base one
inside peft's `disable_adapter()`.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from phi3_lora.errors import UserError

TUNED = "tuned"
BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
END_TOKENS = ("<|end|>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>")

Messages = list[dict[str, str]]


@dataclass
class GenerationSettings:
    """Sampling shared by both sides of a comparison."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    seed: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.temperature <= 5:
            raise UserError(f"temperature must be 0-5; got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1]; got {self.top_p}.")
        if not 1 <= self.max_new_tokens <= 8192:
            raise UserError(f"max_new_tokens must be 1-8192; got {self.max_new_tokens}.")

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens,
                    "repetition_penalty": self.repetition_penalty}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS plus the chat template's end-of-turn tokens that exist in this vocabulary."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_TOKENS if t in vocab)
    return sorted(ids)


class _PairStreamer:
    """A transformers streamer for a batch: decodes each row's new tokens and queues the texts."""

    def __init__(self, tokenizer: Any, rows: int, stop_ids: list[int]) -> None:
        self.tokenizer, self.rows, self.stop_ids = tokenizer, rows, set(stop_ids)
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.done = [False] * rows
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        for row, token in enumerate(value.reshape(self.rows, -1)[:, -1].tolist()):
            if self.done[row]:
                continue
            if token in self.stop_ids:
                self.done[row] = True
            else:
                self.tokens[row].append(token)
        self.queue.put(self.texts())

    def end(self) -> None:
        self.queue.put(None)

    def texts(self) -> list[str]:
        return [self.tokenizer.decode(t, skip_special_tokens=True) for t in self.tokens]


class ChatEngine:
    """One base model, optionally with an adapter, for chat and side-by-side comparison."""

    def __init__(self, model_name: str, adapter_dir: str | Path | None = None, load_in_4bit: bool = False) -> None:
        from phi3_lora import models
        from phi3_lora.config import ModelSettings

        self.model_name, self.reason = models.resolve_name(model_name)
        self.tokenizer = models.load_tokenizer(self.model_name)
        self.base = models.load_model(ModelSettings(name=self.model_name, load_in_4bit=load_in_4bit))
        self.base.eval()
        self.model: Any = self.base
        self.adapter_dir: Path | None = None
        self.stop_ids = stop_token_ids(self.tokenizer)
        self._lock = threading.Lock()  # the adapter switch is model-wide state: one generation at a time
        if adapter_dir:
            self.set_adapter(adapter_dir)

    @property
    def has_adapter(self) -> bool:
        return self.adapter_dir is not None

    def set_adapter(self, adapter_dir: str | Path | None) -> None:
        """Attach (or swap, or with None remove) the tuned adapter; the base weights stay loaded."""
        from peft import PeftModel

        with self._lock:
            if adapter_dir is None:
                if self.has_adapter:
                    self.model.delete_adapter(TUNED)
                self.adapter_dir = None
                return
            adapter_dir = Path(adapter_dir)
            if not (adapter_dir / "adapter_config.json").exists():
                raise UserError(f"{adapter_dir} holds no adapter (adapter_config.json is missing).",
                                hint="Pick a finished run or one of its checkpoints.")
            require_safetensors(adapter_dir)
            self._match_layout(adapter_dir)
            if isinstance(self.model, PeftModel):
                if TUNED in self.model.peft_config:
                    self.model.delete_adapter(TUNED)
                self.model.load_adapter(str(adapter_dir), adapter_name=TUNED, is_trainable=False)
                self.model.set_adapter(TUNED)
            else:
                self.model = PeftModel.from_pretrained(self.base, str(adapter_dir), adapter_name=TUNED,
                                                       is_trainable=False)
            self.model.eval()
            self.adapter_dir = adapter_dir

    def _match_layout(self, adapter_dir: Path) -> None:
        """Split the base's fused layers the way the adapter was trained (lora.fused_slices), or put them back."""
        from peft import PeftModel

        from phi3_lora import fused

        needed = fused.split_needed(adapter_dir)
        if set(needed) == set(fused.split_groups(self.base)):
            return
        if isinstance(self.model, PeftModel):  # another layout: drop the old adapter's LoRA layers first
            self.base = self.model.unload()
            self.model = self.base
        fused.restore_fused_layers(self.base)
        fused.split_fused_layers(self.base, needed)

    def _inputs(self, histories: list[Messages]) -> dict[str, Any]:
        texts = [self.tokenizer.apply_chat_template(h, add_generation_prompt=True, tokenize=False)
                 for h in histories]
        old_side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"  # generation appends on the right
        try:
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            self.tokenizer.padding_side = old_side
        device = next(self.base.parameters()).device
        return {k: v.to(device) for k, v in enc.items()}

    def _can_mix(self) -> bool:
        cfg = getattr(self.model, "peft_config", {}).get(TUNED)
        return cfg is not None and not getattr(cfg, "use_dora", False)

    def stream_pair(self, base_history: Messages, tuned_history: Messages,
                    settings: GenerationSettings) -> Iterator[tuple[str, str]]:
        """Yield (base_text, tuned_text) as both grow. Each history ends with the new user turn."""
        if not self.has_adapter:
            for text in self.stream(base_history, adapter=False, settings=settings):
                yield text, ""
            return
        if not self._can_mix():
            base_text = ""
            for base_text in self.stream(base_history, adapter=False, settings=settings):
                yield base_text, ""
            for tuned_text in self.stream(tuned_history, adapter=True, settings=settings):
                yield base_text, tuned_text
            return
        for texts in self._generate([base_history, tuned_history], settings, adapter_names=[BASE, TUNED]):
            yield texts[0], texts[1]

    def stream(self, history: Messages, adapter: bool, settings: GenerationSettings) -> Iterator[str]:
        """Yield the growing answer for one history, with the adapter on or off."""
        if adapter and not self.has_adapter:
            raise UserError("No adapter is loaded: pick a finished run first.")
        # One row needs no mixed-adapter batch: peft's per-row adapter routing measured ~1.7x slower per token
        # than the plain adapter (bench/train_speed.py); the base side runs inside disable_adapter().
        for texts in self._generate([history], settings, adapter_names=None, disable=not adapter):
            yield texts[0]

    def answer(self, history: Messages, adapter: bool, settings: GenerationSettings) -> str:
        text = ""
        for text in self.stream(history, adapter, settings):
            pass
        return text

    def _generate(self, histories: list[Messages], settings: GenerationSettings,
                  adapter_names: list[str] | None, disable: bool = False) -> Iterator[list[str]]:
        import torch

        inputs = self._inputs(histories)
        streamer = _PairStreamer(self.tokenizer, len(histories), self.stop_ids)
        errors: list[BaseException] = []
        kwargs = dict(**inputs, **settings.generate_kwargs(), streamer=streamer, eos_token_id=self.stop_ids,
                      pad_token_id=self.tokenizer.pad_token_id)
        if adapter_names is not None:
            kwargs["adapter_names"] = adapter_names

        def work() -> None:
            try:
                with self._lock, torch.inference_mode():
                    torch.manual_seed(settings.seed)
                    ctx = (self.model.disable_adapter() if disable and adapter_names is None and self.has_adapter
                           else contextlib.nullcontext())
                    with ctx:
                        self.model.generate(**kwargs)
            except BaseException as exc:  # surfaced in the caller's thread below
                errors.append(exc)
            finally:
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        last = [""] * len(histories)
        while (item := streamer.queue.get()) is not None:
            last = item
            yield item
        thread.join()
        if errors:
            raise errors[0]
        yield last


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def require_safetensors(adapter_dir: Path) -> None:
    """Adapters load from safetensors only: a pickled adapter_model.bin could run code when unpickled."""
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / ADAPTER_WEIGHTS).exists():
        return
    pickles = sorted(p.name for p in adapter_dir.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
    if pickles:
        raise UserError(f"{adapter_dir} has its weights only as {', '.join(pickles)} (a pickle file); phi3_lora loads "
                        f"adapters only from {ADAPTER_WEIGHTS}, because unpickling a file can run code.",
                        hint="Convert it where you trust the file: load it with peft and call "
                             "save_pretrained(folder, safe_serialization=True), then use that folder.")
    raise UserError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}.", hint="Pick a finished run or one of its checkpoints.")


@dataclass
class AdapterRef:
    """Where an adapter is and which base model it belongs to."""

    adapter_dir: Path
    model_name: str
    load_in_4bit: bool


def locate_adapter(path: str | Path) -> AdapterRef:
    """Accept a run folder (its final adapter, else its newest checkpoint), a checkpoint or an adapter folder."""
    from phi3_lora.config import load_yaml
    from phi3_lora.train import ADAPTER, RESOLVED, last_checkpoint

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist.", hint="Give a run folder such as runs/<id> or an adapter folder.")
    if (path / ADAPTER / "adapter_config.json").exists():
        adapter = path / ADAPTER
    elif (path / "adapter_config.json").exists():
        adapter = path
    elif (ckpt := last_checkpoint(path)) is not None:
        adapter = ckpt
    else:
        raise UserError(f"{path} holds no adapter yet (no adapter/ and no complete checkpoint).",
                        hint="Wait for the run to save a checkpoint, or pick a finished run.")
    require_safetensors(adapter)
    import json

    for run_dir in (adapter.parent, adapter.parent.parent):
        if (run_dir / RESOLVED).exists() and (run_dir / "config.yaml").exists():
            name = json.loads((run_dir / RESOLVED).read_text())["model"]
            return AdapterRef(adapter, name, load_yaml(run_dir / "config.yaml").model.load_in_4bit)
    if (adapter / "config.yaml").exists():
        cfg = load_yaml(adapter / "config.yaml")
        return AdapterRef(adapter, cfg.model.name, cfg.model.load_in_4bit)
    base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path") or "auto"
    return AdapterRef(adapter, base, False)
